"""``fdreamer evaluate``: generate a fixed prompt set with a checkpoint and score it (issue 8).

    fdreamer evaluate --checkpoint runs/train/tiny_learn [--data data/sample] [--mode i2v|t2v|both]
                      [--num N] [--steps 20] [--seed 0] [--out runs/eval/x] [--tracking-uri URI]

Prompt set (default: the ``heldout`` split of a ``fdreamer sample-data`` folder, sorted by clip id):

- **I2V**: each clip's frame 0, decoded with :func:`fdreamer.data.video.read_video` at the checkpoint's
  size and fps (as the preprocessing saw it), + the clip's *motion caption*;
- **T2V**: the clip's full caption (text-to-image, then image-to-video; direct T2V for a
  ``factorized=False`` model).

Prompt ``i`` is generated with seed ``--seed + i`` through :class:`fdreamer.inference.pipeline.VideoPipeline`,
the server's pipeline. Per video: CLIP FC / PC (the checkpoint's own CLIP encoders: the tiny CLIP in
CI), mean flow magnitude and warping error (DIS flow), the motion class of the commanded shape
(:func:`fdreamer.eval.metrics.classify_motion` against the manifest's ``motion`` and ``subject_color``)
and the PSNR of generated frame 0 vs the conditioning image (I2V) or the T2I image (T2V). Per mode:
the means, the direction accuracy and a Fréchet distance to the real clips with
:class:`~fdreamer.eval.metrics.PixelFlowFeatures` (``method="eigh"``; *not* FVD: a weight-free CI feature).

Results: a table and one JSON line on stdout, ``results.jsonl`` (one line per video), ``summary.json``
and the first ``--save-videos`` mp4s per mode under ``--out``. Metrics are logged as
``eval_<mode>_<metric>`` to the checkpoint's MLflow run (``trainer_state.json``, ``runs:/<id>``, or
``--run-id``) when a tracking URI is known (``--tracking-uri``, ``MLFLOW_TRACKING_URI``, or the
training default ``sqlite:///<storage_path>/mlflow.db`` next to the run folder).

Ray: with ``--ray-address`` (or a cluster that :func:`cluster.connect.cluster_address` finds) the
prompts go through ``ray.data.from_items(...).map_batches(GenerateAndScore, concurrency=k)``: actors
that load the pipeline once; ``--ray-address none`` forces in-process evaluation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MODES = ("i2v", "t2v")
SUMMARY_KEYS = ("direction_accuracy", "fc", "pc", "flow_magnitude", "warping_error", "psnr0", "fd_pixelflow")
PER_VIDEO_KEYS = ("fc", "pc", "flow_magnitude", "warping_error", "psnr0")


@dataclass
class EvalSettings:
    """What one evaluation generates (everything that changes the videos, nothing about where)."""

    steps: int = 20
    guidance_scale: float = 7.5
    image_guidance_scale: float = 1.5
    sampler: str = "ddim"
    use_ema: bool = True
    clip_pair_mode: str = "consecutive"


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
                  fps: float | None = None, seed: int = 0,
                  i2v_prompt: str = "motion_caption") -> tuple[list[dict[str, Any]], list[np.ndarray]]:
    """Prompt items (one per clip and mode) and the real clips (``[T, H, W, 3]`` uint8, the FD reference).

    Each item: ``id``, ``mode``, ``clip_id``, ``prompt``, ``image`` (I2V: frame 0; T2V: None),
    ``motion``, ``subject_color``, ``seed`` (``seed + index within the mode``). ``i2v_prompt``: the
    manifest field that prompts I2V (``motion_caption``, or ``caption`` as in training).
    """
    if i2v_prompt not in ("motion_caption", "caption"):
        raise ValueError(f"i2v_prompt must be 'motion_caption' or 'caption', got {i2v_prompt!r}")
    from fdreamer.data.video import read_video

    rows = sorted((r for r in read_manifest(data_dir) if split is None or r.get("split") == split),
                  key=lambda r: r["clip_id"])
    if num is not None:
        rows = rows[:num]
    if not rows:
        raise ValueError(f"{data_dir}: no clips in split {split!r}")
    real = [read_video(r["path"], num_frames, fps=fps, size=size).frames for r in rows]
    items: list[dict[str, Any]] = []
    for mode in modes:
        for i, (r, clip) in enumerate(zip(rows, real, strict=True)):
            items.append({
                "id": f"{mode}:{r['clip_id']}", "mode": mode, "clip_id": r["clip_id"],
                "prompt": r[i2v_prompt] if mode == "i2v" else r["caption"],
                "image": clip[0] if mode == "i2v" else None,
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
    from fdreamer.eval.metrics import classify_motion, clip_scores, motion_metrics

    out: dict[str, Any] = dict(clip_scores(frames, item["prompt"], clip_encoder, pair_mode=pair_mode))
    out.update(motion_metrics(frames))
    label, _details = classify_motion(frames, item["subject_color"])
    out["predicted_motion"] = label
    out["correct"] = bool(label == item["motion"])
    out["psnr0"] = psnr(frames[0], reference)
    return out


class GenerateAndScore:
    """Loads the pipeline once; ``__call__`` generates and scores a batch of prompt items (Ray Data
    ``map_batches`` with a dict of columns, or a plain list of item dicts in-process)."""

    def __init__(self, checkpoint: str, settings: dict[str, Any] | None = None, torch_threads: int | None = None) -> None:
        import torch

        from fdreamer.inference.pipeline import VideoPipeline

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.settings = EvalSettings(**(settings or {}))
        self.pipe = VideoPipeline.from_checkpoint(checkpoint, use_ema=self.settings.use_ema)

    def generate(self, item: dict[str, Any]) -> dict[str, Any]:
        from fdreamer.inference.request import VideoRequest

        s = self.settings
        image = item.get("image")
        if image is not None and not self.pipe.supports_image:
            image = None  # Table 4 (b): a direct T2V model gets the motion caption alone
        t0 = time.perf_counter()
        res = self.pipe(VideoRequest(prompt=item["prompt"], image=image, num_inference_steps=s.steps,
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


def _run_local(checkpoint: Path, items: list[dict[str, Any]], settings: EvalSettings) -> list[dict[str, Any]]:
    worker = GenerateAndScore(str(checkpoint), asdict(settings))
    return worker(items)


def _run_ray(checkpoint: Path, items: list[dict[str, Any]], settings: EvalSettings, address: str,
             concurrency: int, num_cpus: float) -> list[dict[str, Any]]:
    import ray

    from cluster.connect import init_ray

    started = not ray.is_initialized()
    if started:
        init_ray(address, log_to_driver=False)
    try:
        # The image column is ragged (None for T2V): ship items as rows of JSON-safe + ndarray columns.
        ds_items = [{**{k: v for k, v in it.items() if k != "image"},
                     "image_bytes": b"" if it["image"] is None else np.ascontiguousarray(it["image"]).tobytes(),
                     "image_shape": json.dumps(None if it["image"] is None else list(it["image"].shape))}
                    for it in items]
        ds = ray.data.from_items(ds_items).map_batches(
            GenerateAndScore, fn_constructor_kwargs={"checkpoint": str(checkpoint), "settings": asdict(settings),
                                                     "torch_threads": max(1, int(num_cpus))},
            batch_size=1, concurrency=concurrency, num_cpus=num_cpus, fn_kwargs={})
        outs = []
        for row in ds.iter_rows():
            outs.append({"row": json.loads(row["row_json"]), "frames": np.asarray(row["frames"])})
    finally:
        if started:
            ray.shutdown()
    order = {it["id"]: i for i, it in enumerate(items)}
    return sorted(outs, key=lambda o: order[o["row"]["id"]])


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
        s = {"n": float(len(idx)), "direction_accuracy": float(np.mean([rows[i]["correct"] for i in idx]))}
        for k in PER_VIDEO_KEYS:
            s[k] = float(np.mean([rows[i][k] for i in idx]))
        if len(idx) >= 2 and len(real) >= 2:
            s["fd_pixelflow"] = frechet_distance(feats([videos[i] for i in idx]), real_f, method="eigh")
        out[mode] = s
    return out


def reference_summary(real: list[np.ndarray], items: list[dict[str, Any]]) -> dict[str, float]:
    """The metrics on the *real* clips: the classifier's accuracy there is the ceiling of the score."""
    from fdreamer.eval.metrics import classify_motion, motion_metrics

    first = {it["clip_id"]: it for it in items}
    rows = list(first.values())
    acc = float(np.mean([classify_motion(v, r["subject_color"])[0] == r["motion"] for v, r in zip(real, rows, strict=True)]))
    mm = [motion_metrics(v) for v in real]
    return {"direction_accuracy": acc, "flow_magnitude": float(np.mean([m["flow_magnitude"] for m in mm])),
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
             log: bool = True, ray_address: str | None = None, concurrency: int = 2, num_cpus: float = 1.0,
             save_videos: int = 4, i2v_prompt: str = "motion_caption") -> EvalResult:
    """Generate and score (module docstring); ``ray_address`` None = in-process, else a Ray address or
    "auto" (:func:`cluster.connect.cluster_address`)."""
    from fdreamer.checkpoint import read_meta, resolve_checkpoint
    from fdreamer.config import load_config
    from fdreamer.schedule import ScheduleConfig

    settings = settings or EvalSettings()
    t0 = time.perf_counter()
    ckpt, found_run = resolve_checkpoint(str(checkpoint), tracking_uri)
    run_id = run_id or found_run
    meta = read_meta(ckpt)
    sched = load_config(ScheduleConfig, ckpt / "schedule.yaml")
    size = meta.get("size") or (sched.height, sched.width)
    hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    num_frames = int(meta.get("num_frames") or sched.num_frames)
    items, real = build_prompts(data, modes=modes, split=split, num=num, num_frames=num_frames, size=hw,
                                fps=meta.get("fps"), seed=seed, i2v_prompt=i2v_prompt)
    t1 = time.perf_counter()
    if ray_address:
        outs = _run_ray(ckpt, items, settings, ray_address, concurrency, num_cpus)
    else:
        outs = _run_local(ckpt, items, settings)
    t2 = time.perf_counter()
    rows = [o["row"] for o in outs]
    videos = [o["frames"] for o in outs]
    summary = summarize(rows, videos, real)
    summary["real"] = reference_summary(real, items)
    timings = {"prompts_s": t1 - t0, "generate_s": t2 - t1, "summary_s": time.perf_counter() - t2,
               "per_video_s": (t2 - t1) / max(1, len(items))}
    result = EvalResult(summary, rows, timings, str(ckpt), run_id, str(out) if out else None)
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


# ----------------------------------------------------------------------------------- CLI


def _ray_target(arg: str | None) -> str | None:
    """``--ray-address``: none/off -> in-process; an address -> it; unset -> a reachable cluster or in-process."""
    if arg is not None:
        return None if arg.lower() in ("none", "off", "local-process", "") else arg
    try:
        from cluster.connect import cluster_address
    except ImportError:
        return None
    addr = cluster_address(None)
    return None if addr == "local" else addr


def _run(args: argparse.Namespace) -> int:
    repo = Path(__file__).resolve().parents[1]
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    modes = MODES if args.mode == "both" else (args.mode,)
    settings = EvalSettings(steps=args.steps, guidance_scale=args.guidance_scale,
                            image_guidance_scale=args.image_guidance_scale, sampler=args.sampler,
                            use_ema=not args.no_ema)
    try:
        res = evaluate(args.checkpoint, args.data, modes=modes, num=args.num, split=None if args.split == "all" else args.split,
                       seed=args.seed, settings=settings, out=args.out, tracking_uri=args.tracking_uri,
                       run_id=args.run_id, log=not args.no_log, ray_address=_ray_target(args.ray_address),
                       concurrency=args.concurrency, save_videos=args.save_videos, i2v_prompt=args.i2v_prompt)
    except (ValueError, FileNotFoundError) as exc:
        print(f"fdreamer evaluate: {exc}", file=sys.stderr)
        return 2
    print(format_table(res), flush=True)
    print(json.dumps(res.json_line()), flush=True)
    return 0


def register_cli(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="generate held-out prompts with a checkpoint, score them (FC, PC, motion), "
                       "log to MLflow; prints a table and a JSON line", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, metavar="DIR|runs:/ID",
                   help="checkpoint folder, training run folder (latest checkpoint) or runs:/<mlflow run id>")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or <storage>/mlflow.db)")
    p.add_argument("--run-id", help="log to this MLflow run (default: the checkpoint's)")
    p.add_argument("--no-log", action="store_true", help="do not log to MLflow")
    p.add_argument("--data", default="data/sample", metavar="DIR", help="sample-data folder with manifest.jsonl")
    p.add_argument("--split", default="heldout", help="manifest split to evaluate ('all' for every clip)")
    p.add_argument("--mode", choices=("i2v", "t2v", "both"), default="i2v", help="image- or text-to-video (default i2v)")
    p.add_argument("--i2v-prompt", choices=("motion_caption", "caption"), default="motion_caption",
                   help="manifest field prompting I2V (default motion_caption; training saw `caption`)")
    p.add_argument("--num", type=int, help="at most this many clips (default: all of the split)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="text guidance scale (default 7.5)")
    p.add_argument("--image-guidance-scale", type=float, default=1.5, help="image guidance scale (default 1.5)")
    p.add_argument("--sampler", choices=("ddim", "euler"), default="ddim")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    p.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i (default 0)")
    p.add_argument("--out", metavar="DIR", help="results.jsonl, summary.json and a few mp4s")
    p.add_argument("--save-videos", type=int, default=4, help="mp4s written per mode (default 4)")
    p.add_argument("--ray-address", help="Ray cluster for Ray Data actors; 'none' = in-process "
                   "(default: a reachable cluster, else in-process)")
    p.add_argument("--concurrency", type=int, default=2, help="GenerateAndScore actors on Ray (default 2)")
    p.set_defaults(func=_run)


__all__ = ["EvalResult", "EvalSettings", "GenerateAndScore", "build_prompts", "evaluate", "format_table",
           "log_to_mlflow", "psnr", "score_video", "summarize"]
