"""The model deployments: ``TextToImage`` (the T2I step) and ``VideoModel`` (image-to-video).

``VideoModel.generate(job, image)`` runs one job from the store to the end: for text-to-video it first
asks ``TextToImage`` (a DeploymentHandle, separately placeable and scalable) for the first frame, then
runs image-to-video, encodes the mp4 and writes the video and the final record to the store. With the
same seed this gives exactly what ``VideoPipeline(request)`` gives for text-to-video (same T2I seed, same
I2V seed, the T2I output is already at the output size).

Progress and cancellation go through the store (:mod:`serving.jobs`): the step callback writes
``progress`` every ``progress_interval_s`` and returns False (which cancels, see
:func:`fdreamer.inference.sampling.notify`) once ``cancel/<id>`` exists, whichever replica the DELETE reached.

Batching: ``@serve.batch`` collects concurrent calls (``batching.max_batch_size``, ``batch_wait_timeout_s``);
a batch is split by *shape key* (mode, frames, height, width, steps, sampler) and each group runs on
one worker thread, request after request through the same pipeline (no padding or mixing of shapes;
the pipeline samples batch 1, so a "batch" saves thread contention and, for text-to-video, lets the
group's T2I calls go out together and batch on the T2I deployment). ``batching.enabled: false`` runs
every call on its own thread instead. Errors never escape a job: a ValueError fails the job as
``invalid_request``, anything else as ``internal_error`` (traceback in the replica log only).
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve
from ray.serve import metrics

from serving.jobs import TERMINAL, JobStore
from serving.settings import DEFAULT_NUM_GPUS, Settings

logger = logging.getLogger("ray.serve")
# MKL picks kernels by memory alignment unless told not to: the same seed could give videos that differ
# by a rounding step between calls. Set before torch (and MKL) load in the replica.
os.environ.setdefault("MKL_CBWR", "COMPATIBLE")

GEN_BUCKETS = [0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800]


def shape_key(job: dict[str, Any]) -> tuple:
    """Requests with equal keys are grouped in a batch (same work per step)."""
    p = job["params"]
    return (job["mode"], p["num_frames"], p["height"], p["width"], p["num_inference_steps"], p["sampler"])


def replica_device(settings: Settings, where: str) -> str:
    """This replica's device from the GPUs Ray assigned it (``num_gpus`` of its deployment, fractional ones
    included): ``auto`` -> ``cuda`` when it has one, else ``cpu``; an explicit ``device`` that contradicts the
    assignment raises a one-line :class:`~fdreamer.device.DeviceConfigError` (the replica fails to start)."""
    import ray

    from fdreamer.device import device_for_gpus

    gpus = float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0))
    return device_for_gpus(settings.device, gpus, where)


def load_pipeline(settings: Settings, checkpoint: str, device: str | None = None):
    """The :class:`~fdreamer.inference.pipeline.VideoPipeline` of ``checkpoint`` (folder, run folder, either on
    ``s3://`` (fetched into the local cache once), or runs:/<id>) on ``device`` (default: ``settings.device``;
    ``auto`` = CUDA when this process sees one): bf16 and TF32 on CUDA unless ``settings.dtype`` says otherwise."""
    import torch

    from fdreamer.checkpoint import resolve_checkpoint
    from fdreamer.device import enable_tf32, inference_dtype, resolve_device
    from fdreamer.encoders import DTYPES
    from fdreamer.inference.pipeline import VideoPipeline

    dev = resolve_device(device or settings.device)
    if dev.type == "cpu":
        torch.set_num_threads(max(1, settings.torch_threads))
    enable_tf32(dev)
    path, _ = resolve_checkpoint(checkpoint, settings.tracking_uri, s3_endpoint=settings.s3_endpoint)
    dtype = inference_dtype(dev, DTYPES[settings.dtype] if settings.dtype else None)
    pipe = VideoPipeline.from_checkpoint(path, device=dev, dtype=dtype, t2i_path=settings.t2i_path)
    return pipe, Path(path)


class _Progress:
    """The step callback: progress to the store (throttled), False once a cancel was requested."""

    def __init__(self, store: JobStore, job_id: str, interval: float, shutdown: threading.Event) -> None:
        self.store, self.job_id, self.interval, self.shutdown = store, job_id, interval, shutdown
        self._last = 0.0

    def __call__(self, step: int, total: int, phase: str) -> bool:
        if self.shutdown.is_set():
            return False
        now = time.monotonic()
        if now - self._last < self.interval and step != total:
            return True
        self._last = now
        if self.store.cancel_requested(self.job_id):
            return False
        self.store.update(self.job_id, status="running", progress={"step": step, "total": total, "phase": phase})
        return True


def _init_model_thread(num_threads: int) -> None:
    """Same floating-point state on every thread that runs the model: torch's intra-op thread count and
    the denormal mode are per-thread, and threads that Ray/gRPC created may differ (the same seed gave
    different videos on different threads before this)."""
    import torch

    torch.set_num_threads(max(1, num_threads))
    torch.set_flush_denormal(False)


#: Defaults of both model deployments (serving/config.yaml overrides them per deployment).
MODEL_DEPLOYMENT_DEFAULTS: dict[str, Any] = {
    "ray_actor_options": {"num_cpus": 0.5, "num_gpus": DEFAULT_NUM_GPUS},
    "max_ongoing_requests": 8,
    "max_queued_requests": 64,
    "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4},
    "health_check_period_s": 10,
    "health_check_timeout_s": 30,
    "graceful_shutdown_wait_loop_s": 2,
}


class _ModelReplica:
    """What both model deployments share: settings, store, pipeline, metrics, shutdown."""

    def _setup(self, settings: dict[str, Any], checkpoint: str | None) -> None:
        self.settings = Settings.from_dict(settings)
        self.device = replica_device(self.settings, f"serving: deployment {type(self).__name__}")
        self.store = JobStore(self.settings.store, self.settings.s3_endpoint)
        self.pipe, self.checkpoint_path = load_pipeline(self.settings, checkpoint or self.settings.checkpoint,
                                                        self.device)
        self.limits = self.pipe.limits  # loads the VAE now, not on the first request
        self._shutdown = threading.Event()
        self._active: set[str] = set()
        b = self.settings.batching
        # model work runs here: one thread when batching (batches run one at a time), else one per job
        self._executor = ThreadPoolExecutor(max_workers=1 if b.enabled else b.max_batch_size,
                                            thread_name_prefix="fdreamer-model", initializer=_init_model_thread,
                                            initargs=(self.settings.torch_threads,))
        self._batched.set_max_batch_size(b.max_batch_size)
        self._batched.set_batch_wait_timeout_s(b.batch_wait_timeout_s)
        logger.info("%s: checkpoint %s, batching %s", type(self).__name__, self.checkpoint_path, b)

    async def _in_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _progress(self, job_id: str) -> _Progress:
        return _Progress(self.store, job_id, self.settings.progress_interval_s, self._shutdown)

    def check_health(self) -> None:
        """Serve calls this every ``health_check_period_s``; raising marks the replica unhealthy."""
        if self.pipe is None:
            raise RuntimeError("pipeline not loaded")
        self.store.ping()

    def __del__(self) -> None:
        # Serve calls __del__ after graceful_shutdown_timeout_s: stop what still runs (the callback
        # returns False) and say so in the records, so clients see a final status and can resubmit.
        shutdown = getattr(self, "_shutdown", None)
        if shutdown is None:
            return
        shutdown.set()
        for job_id in list(getattr(self, "_active", ())):
            try:
                rec = self.store.get(job_id)
                if rec is not None and rec.get("status") not in TERMINAL:
                    self.store.update(job_id, status="failed", finished_at=time.time(),
                                      error={"error": "the replica shut down; submit the job again",
                                             "error_type": "replica_shutdown"})
            except Exception:
                logger.exception("marking job %s failed on shutdown", job_id)


@serve.deployment(name="TextToImage", graceful_shutdown_timeout_s=30, **MODEL_DEPLOYMENT_DEFAULTS)
class TextToImage(_ModelReplica):
    """The T2I step of text-to-video: a uint8 ``[H, W, 3]`` first frame per job."""

    def __init__(self, settings: dict[str, Any]) -> None:
        s = Settings.from_dict(settings)
        self._setup(settings, s.t2i_checkpoint or s.checkpoint)

    async def generate(self, job: dict[str, Any]) -> dict[str, Any]:
        """``{"image": uint8 [H, W, 3], "seconds": float}``, or ``{"cancelled": True}``, or ``{"error", "error_type"}``."""
        if not self.settings.batching.enabled:
            return await self._in_thread(self._run_one, job)
        return await self._batched(job)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def _batched(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return await self._in_thread(_run_grouped, jobs, self._run_one)

    def _run_one(self, job: dict[str, Any]) -> dict[str, Any]:
        from fdreamer.inference.sampling import GenerationCancelled

        p, job_id = job["params"], job["id"]
        self._active.add(job_id)
        t0 = time.perf_counter()
        try:
            if self.store.cancel_requested(job_id) or self._shutdown.is_set():
                return {"cancelled": True}
            image = self.pipe.text_to_image(
                p["prompt"], negative_prompt=p["negative_prompt"], height=p["height"], width=p["width"],
                num_inference_steps=p["num_inference_steps"], guidance_scale=p["guidance_scale"],
                guidance_rescale=p["guidance_rescale"], sampler=p["sampler"], seed=job["seed"],
                callback=self._progress(job_id))
            return {"image": image, "seconds": time.perf_counter() - t0}
        except GenerationCancelled:
            return {"cancelled": True}
        except ValueError as err:
            return {"error": str(err), "error_type": "invalid_request"}
        except Exception:
            logger.exception("T2I for job %s failed", job_id)
            return {"error": "text-to-image failed (see the server log)", "error_type": "internal_error"}
        finally:
            self._active.discard(job_id)

    async def info(self) -> dict[str, Any]:
        return {"limits": self.limits, "defaults": self.pipe.defaults, "checkpoint": str(self.checkpoint_path)}


def _run_grouped(jobs: list[dict[str, Any]], run) -> list[Any]:
    """Run ``jobs`` grouped by :func:`shape_key` (groups in arrival order), results in input order."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, job in enumerate(jobs):
        groups[shape_key(job)].append(i)
    out: list[Any] = [None] * len(jobs)
    for idx in groups.values():
        for i in idx:
            out[i] = run(jobs[i])
    return out


@serve.deployment(name="VideoModel", graceful_shutdown_timeout_s=60, **MODEL_DEPLOYMENT_DEFAULTS)
class VideoModel(_ModelReplica):
    """Runs jobs: T2I (through the ``TextToImage`` handle) when no image is given, then image-to-video."""

    def __init__(self, t2i, settings: dict[str, Any]) -> None:
        self.t2i = t2i
        self._setup(settings, None)
        self.jobs_total = metrics.Counter("fdreamer_jobs_total", description="Finished video jobs by status.",
                                          tag_keys=("status",))
        self.gen_seconds = metrics.Histogram("fdreamer_generation_seconds", boundaries=GEN_BUCKETS,
                                             description="Seconds from a job's start to its video in the store.",
                                             tag_keys=("mode",))

    async def info(self) -> dict[str, Any]:
        """Limits and defaults of the loaded checkpoint (the ingress validates against them)."""
        return {"limits": self.limits, "defaults": self.pipe.defaults, "checkpoint": str(self.checkpoint_path)}

    async def generate(self, job: dict[str, Any], image: np.ndarray | None) -> dict[str, Any]:
        """Run ``job`` (its record is already in the store) and return its final record."""
        if not self.settings.batching.enabled:
            return await self._run_async(job, image)
        return await self._batched(job, image)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def _batched(self, jobs: list[dict[str, Any]], images: list[np.ndarray | None]) -> list[dict[str, Any]]:
        # T2I for the whole batch at once (they batch again on TextToImage), then I2V grouped by shape
        first = await asyncio.gather(*(self._first_frame(j, im) for j, im in zip(jobs, images)))
        return await self._in_thread(_run_grouped, [{**j, "_first": f} for j, f in zip(jobs, first)],
                                      self._finish)

    async def _run_async(self, job: dict[str, Any], image: np.ndarray | None) -> dict[str, Any]:
        first = await self._first_frame(job, image)
        return await self._in_thread(self._finish, {**job, "_first": first})

    async def _first_frame(self, job: dict[str, Any], image: np.ndarray | None) -> dict[str, Any]:
        """``{"image": ...}`` (given or from T2I), ``{"cancelled": True}`` or ``{"error", "error_type"}``."""
        job_id = job["id"]
        try:
            if self.store.cancel_requested(job_id) or self._shutdown.is_set():
                return {"cancelled": True}
            self.store.update(job_id, status="running", started_at=time.time())
            if image is not None:
                return {"image": np.array(image, dtype=np.uint8, copy=True), "seconds": 0.0}
            out = await self.t2i.generate.remote(job)
            if "image" in out:  # own the pixels: not a view of the object store's buffer
                out["image"] = np.array(out["image"], dtype=np.uint8, copy=True)
            return out
        except Exception:
            logger.exception("T2I call for job %s failed", job_id)
            return {"error": "the text-to-image deployment failed (see the server log)", "error_type": "internal_error"}

    def _finish(self, job: dict[str, Any]) -> dict[str, Any]:
        """I2V on the first frame, mp4 to the store, final record; never raises."""
        from fdreamer.inference.pipeline import GenerationCancelled, VideoRequest, save_video

        job_id, p, first = job["id"], job["params"], job["_first"]
        self._active.add(job_id)
        time.perf_counter()
        timings: dict[str, float] = {"t2i": round(float(first.get("seconds", 0.0)), 4)}
        try:
            if first.get("cancelled"):
                raise GenerationCancelled("cancelled before the video phase")
            if "error" in first:
                return self._final(job_id, "failed", error={"error": first["error"],
                                                            "error_type": first["error_type"]})
            request = VideoRequest(
                prompt=p["prompt"], image=first["image"], negative_prompt=p["negative_prompt"],
                motion_prompt=p.get("motion_prompt"),
                num_frames=p["num_frames"], height=p["height"], width=p["width"], fps=p["fps"],
                num_inference_steps=p["num_inference_steps"], guidance_scale=p["guidance_scale"],
                image_guidance_scale=p["image_guidance_scale"], guidance_rescale=p["guidance_rescale"],
                sampler=p["sampler"], seed=job["seed"])
            result = self.pipe(request, callback=self._progress(job_id))
            t1 = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="fdreamer-serve-") as tmp:
                data = save_video(result, Path(tmp) / "video.mp4").read_bytes()
            self.store.put_video(job_id, data)
            timings.update({k: round(v, 4) for k, v in result.timings.items() if k in ("i2v", "decode")})
            timings["encode"] = round(time.perf_counter() - t1, 4)
            rec = self.store.get(job_id) or {}
            started = rec.get("started_at") or time.time()
            timings["queued"] = round(max(0.0, started - rec.get("created_at", started)), 4)
            timings["total"] = round(time.time() - rec.get("created_at", started), 4)
            self.gen_seconds.observe(time.time() - started, tags={"mode": job["mode"]})
            total = p["num_inference_steps"]
            return self._final(job_id, "succeeded", timings=timings, video_bytes=len(data),
                               progress={"step": total, "total": total, "phase": "done"})
        except GenerationCancelled:
            if self._shutdown.is_set():
                return self._final(job_id, "failed", error={"error": "the replica shut down; submit the job again",
                                                            "error_type": "replica_shutdown"})
            return self._final(job_id, "cancelled")
        except ValueError as err:
            return self._final(job_id, "failed", error={"error": str(err), "error_type": "invalid_request"})
        except Exception:
            logger.exception("job %s failed", job_id)
            return self._final(job_id, "failed", error={"error": "generation failed (see the server log)",
                                                        "error_type": "internal_error"})
        finally:
            self._active.discard(job_id)

    def _final(self, job_id: str, status: str, **fields: Any) -> dict[str, Any]:
        self.jobs_total.inc(tags={"status": status})
        rec = self.store.update(job_id, status=status, finished_at=time.time(), **fields)
        return rec or {"id": job_id, "status": status, **fields}
