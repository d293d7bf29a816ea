"""Evaluation: generate a fixed prompt set with a checkpoint and score it (``fdreamer evaluate``).

    fdreamer evaluate --checkpoint runs/train/tiny_learn [--data data/sample] [--mode i2v|t2v|both]
                      [--num N] [--sampling.steps 20] [--seed 0] [--out runs/eval/x] [--tracking_uri URI]

Prompt set (default: the ``heldout`` split of a ``fdreamer sample-data`` folder, sorted by clip id):

- **I2V**: each clip's frame 0, decoded with :func:`fdreamer.data.video.read_video` at the checkpoint's
  size and fps (as the preprocessing saw it), + the clip's *motion caption*;
- **T2V**: the clip's full caption (text-to-image, then image-to-video; direct T2V for a
  ``factorized=False`` model).

Prompt ``i`` is generated with seed ``--seed + i`` through :class:`fdreamer.inference.pipeline.VideoPipeline`,
the server's pipeline. Per video: CLIP FC / PC (the checkpoint's own CLIP encoders: the tiny CLIP in
CI), mean flow magnitude and warping error (DIS flow), the motion class of the commanded shape
(:func:`fdreamer.eval.metrics.classify_motion` against the manifest's ``motion`` and ``subject_color``),
the colour of frame 0's subject (:func:`~fdreamer.eval.metrics.subject_colour`; ``colour_accuracy``: the
T2V check that the T2I step drew the prompt's colour) and the PSNR of generated frame 0 vs the conditioning image (I2V) or the T2I image (T2V). Per mode:
the means, the direction accuracy and a Fréchet distance to the real clips with
:class:`~fdreamer.eval.metrics.PixelFlowFeatures` (``method="eigh"``; *not* FVD: a weight-free CI feature).

Results: a table and one JSON line on stdout, ``results.jsonl`` (one line per video), ``summary.json``
and the first ``--save-videos`` mp4s per mode under ``--out``. Metrics are logged as
``eval_<mode>_<metric>`` to the checkpoint's MLflow run (``trainer_state.json``, ``runs:/<id>``, or
``--run-id``) when a tracking URI is known (``--tracking-uri``, ``MLFLOW_TRACKING_URI``, or the
training default ``sqlite:///<storage_path>/mlflow.db`` next to the run folder).

Where the generation runs is the caller's choice (``runner``): in-process here (``fdreamer evaluate``), or
Ray Data actors in ``training/evaluate_job.py`` (the library imports no Ray).
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fdreamer.config import nested, opt
from fdreamer.inference.request import DEFAULT_GUIDANCE_SCALE, DEFAULT_IMAGE_GUIDANCE_SCALE

MODES = ("i2v", "t2v")


class EvalError(ValueError):
    """An evaluation that cannot run as asked (an option, the prompt data): the entry points print it as one
    line and exit 2; any other exception is a bug and keeps its traceback."""
SUMMARY_KEYS = ("direction_accuracy", "colour_accuracy", "fc", "pc", "flow_magnitude", "warping_error", "psnr0", "fd_pixelflow")
PER_VIDEO_KEYS = ("fc", "pc", "flow_magnitude", "warping_error", "psnr0")


@dataclass
class EvalSettings:
    """What one evaluation generates (everything that changes the videos, nothing about where)."""

    steps: int = opt(20, "denoising steps per video (fewer than serving's default: many videos)")
    guidance_scale: float = opt(DEFAULT_GUIDANCE_SCALE, "text guidance scale")
    image_guidance_scale: float = opt(DEFAULT_IMAGE_GUIDANCE_SCALE, "image guidance scale")
    sampler: Literal["ddim", "euler"] = opt("ddim", "diffusers sampler")
    use_ema: bool = opt(True, "use the EMA weights when the checkpoint has them")
    clip_pair_mode: Literal["consecutive", "all"] = opt("consecutive", "frame pairs of the CLIP frame consistency")
    t2i_path: str | None = opt(None, "a local diffusers Stable Diffusion folder drawing T2V's first frame (e.g. the tiny "
                               "models folder with the committed T2I); default: the checkpoint's own spatial UNet")


@dataclass
class EvalConfig:
    """``fdreamer evaluate`` / ``training/evaluate_job.py`` options (``--key value``; ``--help`` lists them)."""

    checkpoint: str = opt(help="checkpoint folder, training run folder (its latest checkpoint) or runs:/<mlflow run id>")
    data: str = opt("data/sample", "sample-data folder with manifest.jsonl")
    split: str = opt("heldout", "manifest split to evaluate ('all' for every clip)")
    mode: Literal["i2v", "t2v", "both"] = opt("i2v", "image- or text-to-video")
    i2v_prompt: Literal["motion_caption", "caption"] = opt("motion_caption", "manifest field prompting I2V (training saw `caption`)")
    num: int | None = opt(None, "at most this many clips (default: all of the split)")
    seed: int = opt(0, "prompt i uses seed + i")
    out: str | None = opt(None, "folder for results.jsonl, summary.json and a few mp4s")
    save_videos: int = opt(4, "mp4s written per mode")
    tracking_uri: str | None = opt(None, "MLflow tracking URI (default: MLFLOW_TRACKING_URI or <storage>/mlflow.db)")
    run_id: str | None = opt(None, "log to this MLflow run (default: the checkpoint's)")
    log: bool = opt(True, "log the metrics to the checkpoint's MLflow run")
    s3_endpoint: str | None = opt(None, "S3 endpoint URL for an s3:// checkpoint (MinIO / moto; default: AWS)")
    device: str = opt("auto", "where the videos are generated: auto (CUDA when this process has a GPU; under "
                      "training/evaluate_job.py: when --num_gpus > 0), cpu, cuda or cuda:<i>; on CUDA in bf16 with "
                      "TF32 (the videos then differ from the CPU's fp32 ones by rounding)")
    sampling: EvalSettings = nested(EvalSettings, "how each video is generated")


@dataclass
class EvalResult:
    """Per-mode summaries, per-video rows, timings and where things went."""

    summary: dict[str, dict[str, float]]
    rows: list[dict[str, Any]]
    timings: dict[str, float] = field(default_factory=dict)
    checkpoint: str = ""
    run_id: str | None = None
    out: str | None = None

    def json_line(self) -> dict[str, Any]:
        flat: dict[str, Any] = {"checkpoint": self.checkpoint, "run_id": self.run_id, "out": self.out}
        for mode, s in self.summary.items():
            flat.update({f"{mode}_{k}": v for k, v in s.items()})
        flat["timings"] = self.timings
        return flat


# ----------------------------------------------------------------------------------- checkpoints


def default_tracking_uri(checkpoint: Path) -> str | None:
    """``MLFLOW_TRACKING_URI``, else the training default: ``<storage_path>/mlflow.db`` two levels up."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    db = checkpoint.resolve().parents[1] / "mlflow.db"
    return f"sqlite:///{db}" if db.is_file() else None


# ----------------------------------------------------------------------------------- prompts


def read_manifest(data_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(data_dir) / "manifest.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest.jsonl (make one with `fdreamer sample-data DIR`)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for r in rows:
        if not Path(r["path"]).is_absolute():
            r["path"] = str(Path(data_dir) / r["path"])
    return rows


def build_prompts(data_dir: str | Path, *, modes: tuple[str, ...] = ("i2v",), split: str | None = "heldout",
                  num: int | None = None, num_frames: int = 8, size: tuple[int, int] = (64, 64),
                  fps: float | None = None, seed: int = 0, i2v_prompt: str = "motion_caption",
                  t5_caption: str = "caption") -> tuple[list[dict[str, Any]], list[np.ndarray]]:
    """Prompt items (one per clip and mode) and the real clips (``[T, H, W, 3]`` uint8, the FD reference).

    Each item: ``id``, ``mode``, ``clip_id``, ``prompt``, ``image`` (I2V: frame 0; T2V: None),
    ``motion``, ``subject_color``, ``seed`` (``seed + index within the mode``). ``i2v_prompt``: the
    manifest field that prompts I2V (``motion_caption``, or ``caption`` as in training). ``t5_caption``: what
    the checkpoint's T5 read in training (its ``t5_caption`` meta); ``motion_caption`` gives every item a
    ``motion_prompt`` (the manifest's motion caption, for T5), else None (T5 reads the prompt).
    """
    if i2v_prompt not in ("motion_caption", "caption"):
        raise EvalError(f"i2v_prompt must be 'motion_caption' or 'caption', got {i2v_prompt!r}")
    from fdreamer.data.video import read_video

    rows = sorted((r for r in read_manifest(data_dir) if split is None or r.get("split") == split),
                  key=lambda r: r["clip_id"])
    if num is not None:
        rows = rows[:num]
    if not rows:
        raise EvalError(f"{data_dir}: no clips in split {split!r}")
    real = [read_video(r["path"], num_frames, fps=fps, size=size).frames for r in rows]
    items: list[dict[str, Any]] = []
    for mode in modes:
        for i, (r, clip) in enumerate(zip(rows, real, strict=True)):
            items.append({
                "id": f"{mode}:{r['clip_id']}", "mode": mode, "clip_id": r["clip_id"],
                "prompt": r[i2v_prompt] if mode == "i2v" else r["caption"],
                "image": clip[0] if mode == "i2v" else None,
                "motion_prompt": r["motion_caption"] if t5_caption == "motion_caption" else None,
                "motion": r["motion"], "subject_color": r["subject_color"], "seed": seed + i,
            })
    return items, real


# ----------------------------------------------------------------------------------- scoring


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (capped at 100 for identical images)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 100.0 if mse == 0 else float(10 * math.log10(255.0**2 / mse))


def score_video(frames: np.ndarray, item: dict[str, Any], reference: np.ndarray, clip_encoder: Any,
                pair_mode: str = "consecutive") -> dict[str, Any]:
    """Per-video metrics (see the module docstring); ``reference`` is the frame-0 target image."""
    from fdreamer.eval.metrics import classify_motion, clip_scores, motion_metrics, subject_colour

    out: dict[str, Any] = dict(clip_scores(frames, item["prompt"], clip_encoder, pair_mode=pair_mode))
    out.update(motion_metrics(frames))
    label, _details = classify_motion(frames, item["subject_color"])
    out["predicted_motion"] = label
    out["correct"] = bool(label == item["motion"])
    out["psnr0"] = psnr(frames[0], reference)
    out["colour"] = subject_colour(frames[0])  # T2V: does the first frame show the prompt's colour?
    out["colour_correct"] = bool(out["colour"] == item["subject_color"])
    return out


class GenerateAndScore:
    """Loads the pipeline once; ``__call__`` generates and scores a batch of prompt items (Ray Data
    ``map_batches`` with a dict of columns, or a plain list of item dicts in-process)."""

    def __init__(self, checkpoint: str, settings: dict[str, Any] | None = None, torch_threads: int | None = None,
                 s3_endpoint: str | None = None, device: str = "auto") -> None:
        import torch

        from fdreamer.checkpoint import resolve_checkpoint
        from fdreamer.device import enable_tf32, inference_dtype, resolve_device
        from fdreamer.inference.pipeline import VideoPipeline

        if torch_threads:
            torch.set_num_threads(torch_threads)
        if checkpoint.startswith("s3://"):  # fetched into this node's cache (an actor may run on any node)
            checkpoint = str(resolve_checkpoint(checkpoint, s3_endpoint=s3_endpoint)[0])
        self.settings = EvalSettings(**(settings or {}))
        dev = resolve_device(device)  # auto: CUDA when this process has one (a Ray actor: its num_gpus decides)
        enable_tf32(dev)
        self.pipe = VideoPipeline.from_checkpoint(checkpoint, use_ema=self.settings.use_ema, t2i_path=self.settings.t2i_path,
                                                  device=dev, dtype=inference_dtype(dev, None))

    def generate(self, item: dict[str, Any]) -> dict[str, Any]:
        from fdreamer.inference.request import VideoRequest

        s = self.settings
        image = item.get("image")
        if image is not None and not self.pipe.supports_image:
            image = None  # Table 4 (b): a direct T2V model gets the motion caption alone
        t0 = time.perf_counter()
        motion = item.get("motion_prompt")  # "" (Ray Data rows) or None: T5 reads the prompt
        res = self.pipe(VideoRequest(prompt=item["prompt"], motion_prompt=motion if isinstance(motion, str) and motion else None,
                                     image=image, num_inference_steps=s.steps,
                                     guidance_scale=s.guidance_scale, image_guidance_scale=s.image_guidance_scale,
                                     sampler=s.sampler, seed=int(item["seed"])))
        t1 = time.perf_counter()
        ref = item["image"] if item.get("image") is not None else res.first_frame
        scores = score_video(res.frames, item, np.asarray(ref, dtype=np.uint8), self.pipe.encoders, s.clip_pair_mode)
        row = {k: item[k] for k in ("id", "mode", "clip_id", "prompt", "motion", "subject_color", "seed")}
        row.update(scores, gen_s=t1 - t0, score_s=time.perf_counter() - t1, fps=res.fps)
        return {"row": row, "frames": res.frames}

    def __call__(self, batch: Any) -> Any:
        if isinstance(batch, list):
            return [self.generate(item) for item in batch]
        n = len(batch["id"])
        items = [{k: _unbox(v[i]) for k, v in batch.items()} for i in range(n)]
        for it in items:
            shape = json.loads(it.pop("image_shape", "null"))
            raw = it.pop("image_bytes", b"")
            it["image"] = None if shape is None else np.frombuffer(raw, np.uint8).reshape(shape).copy()
        outs = [self.generate(item) for item in items]
        return {"row_json": np.array([json.dumps(o["row"]) for o in outs], dtype=object),
                "frames": np.stack([o["frames"] for o in outs])}


def _unbox(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray) and v.dtype == object and v.ndim == 0:
        return v.item()
    return v


# ----------------------------------------------------------------------------------- running


#: ``runner(checkpoint, items, settings)``: ``checkpoint`` is a local folder or the ``s3://`` checkpoint folder.
Runner = Callable[[str, list[dict[str, Any]], "EvalSettings"], list[dict[str, Any]]]


def run_in_process(checkpoint: str, items: list[dict[str, Any]], settings: EvalSettings,
                   s3_endpoint: str | None = None, device: str = "auto") -> list[dict[str, Any]]:
    """Generate and score every item here (one :class:`GenerateAndScore` on ``device``)."""
    worker = GenerateAndScore(str(checkpoint), asdict(settings), s3_endpoint=s3_endpoint, device=device)
    return worker(items)


def summarize(rows: list[dict[str, Any]], videos: list[np.ndarray], real: list[np.ndarray]) -> dict[str, dict[str, float]]:
    """Per-mode means + direction accuracy + Fréchet distance (PixelFlowFeatures) to the real clips."""
    from fdreamer.eval.metrics import PixelFlowFeatures, frechet_distance

    feats = PixelFlowFeatures()
    real_f = feats(real)
    out: dict[str, dict[str, float]] = {}
    for mode in MODES:
        idx = [i for i, r in enumerate(rows) if r["mode"] == mode]
        if not idx:
            continue
        s = {"n": float(len(idx)), "direction_accuracy": float(np.mean([rows[i]["correct"] for i in idx])),
             "colour_accuracy": float(np.mean([rows[i]["colour_correct"] for i in idx]))}
        for k in PER_VIDEO_KEYS:
            s[k] = float(np.mean([rows[i][k] for i in idx]))
        if len(idx) >= 2 and len(real) >= 2:
            s["fd_pixelflow"] = frechet_distance(feats([videos[i] for i in idx]), real_f, method="eigh")
        out[mode] = s
    return out


def reference_summary(real: list[np.ndarray], items: list[dict[str, Any]]) -> dict[str, float]:
    """The metrics on the *real* clips: the classifier's accuracy there is the ceiling of the score."""
    from fdreamer.eval.metrics import classify_motion, motion_metrics, subject_colour

    first = {it["clip_id"]: it for it in items}
    rows = list(first.values())
    acc = float(np.mean([classify_motion(v, r["subject_color"])[0] == r["motion"] for v, r in zip(real, rows, strict=True)]))
    colour = float(np.mean([subject_colour(v[0]) == r["subject_color"] for v, r in zip(real, rows, strict=True)]))
    mm = [motion_metrics(v) for v in real]
    return {"direction_accuracy": acc, "colour_accuracy": colour, "flow_magnitude": float(np.mean([m["flow_magnitude"] for m in mm])),
            "warping_error": float(np.mean([m["warping_error"] for m in mm]))}


def log_to_mlflow(run_id: str, tracking_uri: str | None, summary: dict[str, dict[str, float]],
                  params: dict[str, Any], artifacts: list[Path] = ()) -> None:
    """``eval_<mode>_<metric>`` metrics (+ ``eval_*`` params and the results files) on an existing run."""
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri)
    ts = int(time.time() * 1000)
    metrics = [mlflow.entities.Metric(f"eval_{mode}_{k}", float(v), ts, 0)
               for mode, s in summary.items() for k, v in s.items() if v is not None and math.isfinite(v)]
    client.log_batch(run_id, metrics=metrics)
    existing = client.get_run(run_id).data.params
    for k, v in params.items():
        if f"eval_{k}" not in existing:
            client.log_param(run_id, f"eval_{k}", v)
    for a in artifacts:
        client.log_artifact(run_id, str(a), "eval")


def evaluate(checkpoint: str | Path, data: str | Path, *, modes: tuple[str, ...] = ("i2v",), num: int | None = None,
             split: str | None = "heldout", seed: int = 0, settings: EvalSettings | None = None,
             out: str | Path | None = None, tracking_uri: str | None = None, run_id: str | None = None,
             log: bool = True, runner: Runner | None = None,
             save_videos: int = 4, i2v_prompt: str = "motion_caption", s3_endpoint: str | None = None,
             device: str = "auto") -> EvalResult:
    """Generate and score (module docstring). ``runner(checkpoint, items, settings)`` generates the items
    (default :func:`run_in_process`; ``training/evaluate_job.py`` passes one on Ray Data). An ``s3://``
    checkpoint (or run folder, ``s3_endpoint`` for MinIO / moto) is fetched here for its metadata and handed
    to the runner as the ``s3://`` checkpoint folder, which each generating process fetches on its node."""
    from fdreamer.checkpoint import read_meta, resolve_checkpoint
    from fdreamer.config import load_config
    from fdreamer.schedule import ScheduleConfig

    settings = settings or EvalSettings()
    t0 = time.perf_counter()
    ckpt, found_run = resolve_checkpoint(str(checkpoint), tracking_uri, s3_endpoint=s3_endpoint)
    source = str(ckpt)
    if str(checkpoint).startswith("s3://"):
        from fdreamer import checkpoint_store

        source = checkpoint_store.latest(str(checkpoint), s3_endpoint) or source
    run_id = run_id or found_run
    meta = read_meta(ckpt)
    sched = load_config(ScheduleConfig, ckpt / "schedule.yaml")
    size = meta.get("size") or (sched.height, sched.width)
    hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    num_frames = int(meta.get("num_frames") or sched.num_frames)
    items, real = build_prompts(data, modes=modes, split=split, num=num, num_frames=num_frames, size=hw,
                                fps=meta.get("fps"), seed=seed, i2v_prompt=i2v_prompt,
                                t5_caption=meta.get("t5_caption", "caption"))
    t1 = time.perf_counter()
    runner = runner or functools.partial(run_in_process, s3_endpoint=s3_endpoint, device=device)
    outs = runner(source, items, settings)
    t2 = time.perf_counter()
    rows = [o["row"] for o in outs]
    videos = [o["frames"] for o in outs]
    summary = summarize(rows, videos, real)
    summary["real"] = reference_summary(real, items)
    timings = {"prompts_s": t1 - t0, "generate_s": t2 - t1, "summary_s": time.perf_counter() - t2,
               "per_video_s": (t2 - t1) / max(1, len(items))}
    result = EvalResult(summary, rows, timings, source, run_id, str(out) if out else None)
    artifacts: list[Path] = []
    if out is not None:
        artifacts = write_outputs(Path(out), result, videos, save_videos)
    if log and run_id:
        uri = tracking_uri or default_tracking_uri(ckpt)
        if uri:
            log_to_mlflow(run_id, uri, {m: s for m, s in summary.items()},
                          {"data": str(data), "steps": settings.steps, "guidance_scale": settings.guidance_scale,
                           "image_guidance_scale": settings.image_guidance_scale, "seed": seed,
                           "num": len(real), "i2v_prompt": i2v_prompt}, [a for a in artifacts if a.suffix == ".json" or a.suffix == ".jsonl"])
    result.timings["total_s"] = time.perf_counter() - t0
    return result


def write_outputs(out: Path, result: EvalResult, videos: list[np.ndarray], save_videos: int) -> list[Path]:
    from fdreamer.data.video import write_video

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.jsonl", out / "summary.json"]
    paths[0].write_text("".join(json.dumps(r) + "\n" for r in result.rows))
    paths[1].write_text(json.dumps(result.json_line(), indent=2) + "\n")
    per_mode: dict[str, int] = {}
    for row, frames in zip(result.rows, videos, strict=True):
        k = per_mode.get(row["mode"], 0)
        if k < save_videos:
            name = f"{row['mode']}_{row['clip_id']}_{row['motion']}_{row['predicted_motion']}.mp4"
            paths.append(write_video(out / name, frames, float(row.get("fps") or 6.0)))
            per_mode[row["mode"]] = k + 1
    return paths


def format_table(result: EvalResult) -> str:
    cols = ("n", *SUMMARY_KEYS)
    lines = ["| mode | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for mode, s in result.summary.items():
        cells = [("–" if s.get(k) is None else f"{s[k]:.4g}") for k in cols]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = ["EvalConfig", "EvalError", "EvalResult", "EvalSettings", "GenerateAndScore", "Runner", "build_prompts", "evaluate",
           "evaluate_config", "format_table", "log_to_mlflow", "psnr", "run_in_process", "score_video", "summarize"]


def evaluate_config(cfg: EvalConfig, runner: Runner | None = None) -> EvalResult:
    """:func:`evaluate` with the options of an :class:`EvalConfig`."""
    if not cfg.checkpoint:
        raise EvalError("checkpoint: give a checkpoint folder, a run folder or runs:/<run id> (--checkpoint DIR)")
    modes = MODES if cfg.mode == "both" else (cfg.mode,)
    return evaluate(cfg.checkpoint, cfg.data, modes=modes, num=cfg.num, split=None if cfg.split == "all" else cfg.split,
                    seed=cfg.seed, settings=cfg.sampling, out=cfg.out, tracking_uri=cfg.tracking_uri, run_id=cfg.run_id,
                    log=cfg.log, runner=runner, save_videos=cfg.save_videos, i2v_prompt=cfg.i2v_prompt,
                    s3_endpoint=cfg.s3_endpoint, device=cfg.device)


def domain_errors() -> tuple[type[BaseException], ...]:
    """What ``fdreamer evaluate`` and ``training/evaluate_job.py`` report in one line (exit 2), by class: a bad
    option or prompt set, a checkpoint that is missing or does not fit, a device that contradicts the GPUs,
    a missing manifest."""
    from fdreamer.checkpoint import CheckpointError
    from fdreamer.config import ConfigError
    from fdreamer.device import DeviceConfigError

    return (EvalError, CheckpointError, ConfigError, DeviceConfigError, FileNotFoundError)
