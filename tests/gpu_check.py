"""GPU check: what the first GPU run of training and serving needs, on ONE GPU, in minutes. Prints ONE JSON line.

    python tests/gpu_check.py                 # CUDA: sd15 at stage-1 shapes (make gpu-check); ~4-6 min on one H100
    python tests/gpu_check.py --cpu --tiny    # the same steps on the CPU at the tiny preset (< 60 s; CI runs it)

Drives the library without Ray (``TrainWorker.setup_model`` / ``optimize``, as the Ray Train loop does) and
imports neither Ray nor pytest: it runs on a machine with torch, diffusers, transformers, einops, pyarrow and
safetensors. The model code needs diffusers (the spatial UNet is diffusers' ``UNet2DConditionModel``).

1. **train**: the video UNet of ``--preset`` (``sd15``: random init, not SD weights) at
   ``training/configs/stage1.yaml``'s shapes (32 frames x 256 x 256 -> 32x32x32 latents, micro-batch 1,
   T5 4096, CLIP 768), bf16 autocast on CUDA, gradient checkpointing, EMA, fused AdamW on CUDA:
   ``--steps`` optimizer steps on random batches; the peak of ``torch.cuda.max_memory_allocated`` against
   the static estimate (fp32 weights + grads + two AdamW moments + EMA = 20 bytes per trainable parameter);
2. **resume**: the checkpoint written before the last step (``training/checkpointing.py``'s layout), restored
   in a new worker, every optimizer / EMA tensor on its parameter's device, then the last step again: weights,
   EMA and AdamW moments against the uninterrupted run's (deterministic algorithms on CUDA; the ratio of
   the largest difference to the largest change of that step is the check);
3. **sample**: one text-to-video request (T2I then I2V, ``--sample-steps`` steps each) through
   ``fdreamer.inference.pipeline.VideoPipeline`` on the tiny models (the committed tiny I2V checkpoint; a
   random tiny one without it), bf16 + TF32 on CUDA.

JSON fields: docs/results.md, "GPU check".
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for path in (str(REPO), str(REPO / "tests")):  # the library and tests/helpers, without an installed package
    if path not in sys.path:
        sys.path.insert(0, path)

GIB = 2**30
RESUME_RATIO_MAX = 0.01  # largest resumed-vs-uninterrupted difference / largest change of the step


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _update_max(before: dict, model: Any) -> float:
    """Largest |w_after - w_before| over the model's weights (``before`` on the CPU, compared on the device)."""
    import torch

    with torch.no_grad():
        return max(float((v.float() - before[k].to(v.device)).abs().max()) for k, v in model.state_dict().items())


def _diff_on_device(snap: dict, worker: Any) -> dict[str, float]:
    """:func:`helpers.resume.max_abs_diff` of a CPU snapshot against a live worker, tensor by tensor on its
    device (no second full copy in host memory)."""
    import torch

    from training import parallel

    model = parallel.unwrap(worker.model)
    names = {id(p): n for n, p in model.named_parameters()}
    live = {"model": model.state_dict(), "ema": worker.ema.shadow if worker.ema else {}, "optim": {}}
    for p, st in worker.optimizer.state.items():
        for key in ("exp_avg", "exp_avg_sq"):
            live["optim"][f"{names[id(p)]}.{key}"] = st[key]
    out = {}
    with torch.no_grad():
        for part, tensors in snap.items():
            if tensors.keys() != live[part].keys():
                raise AssertionError(f"{part}: the resumed worker holds other tensors")
            out[part] = max((float((live[part][k].float() - v.to(live[part][k].device)).abs().max())
                             for k, v in tensors.items()), default=0.0)
    return out


def check_training(args: argparse.Namespace, device: Any, work: Path) -> dict[str, Any]:
    import torch

    from fdreamer.models import count_parameters
    from fdreamer.train.step import state_device_problems
    from helpers import resume as R

    on_cuda = device.type == "cuda"
    cfg = R.train_config(args.preset, model={"gradient_checkpointing": True},
                         mixed_precision="bf16" if on_cuda else "no")
    batches = [R.synthetic_batch(cfg, i) for i in range(args.steps)]
    t0 = time.perf_counter()
    worker = R.new_worker(cfg, device)
    build_s = time.perf_counter() - t0
    model = worker.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    params = sum(p.numel() for p in model.parameters())
    by_group = count_parameters(model)
    static = 4 * params + (4 + 8 + 4) * trainable  # fp32 weights; grads, two AdamW moments and EMA of the trainable
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    step_s, losses, before_last = [], [], None
    checkpoint = work / "checkpoint_resume"
    save_s = 0.0
    for i, batch in enumerate(batches):
        if i == len(batches) - 1:  # the checkpoint the resume starts from, and the weights the last step changes
            t = time.perf_counter()
            R.save(worker, checkpoint)
            save_s = time.perf_counter() - t
            before_last = {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in model.state_dict().items()}
        _sync(device)
        t = time.perf_counter()
        result = R.step(worker, batch)
        _sync(device)
        step_s.append(round(time.perf_counter() - t, 3))
        losses.append(round(result.loss, 5))
    peak = torch.cuda.max_memory_allocated(device) if on_cuda else None
    total = torch.cuda.get_device_properties(device).total_memory if on_cuda else None
    update = _update_max(before_last, model)
    uninterrupted = R.snapshot(worker)
    fused = bool(worker.optimizer.param_groups[0].get("fused"))
    del worker, model, result, before_last
    gc.collect()
    if on_cuda:
        torch.cuda.empty_cache()

    t = time.perf_counter()
    resumed = R.new_worker(cfg, device, source=checkpoint)
    restore_s = time.perf_counter() - t
    problems = state_device_problems(resumed.model, resumed.optimizer, resumed.ema)
    resumed_step = resumed.state.step
    R.step(resumed, batches[-1])
    diff = _diff_on_device(uninterrupted, resumed)
    ratio = diff["model"] / update if update > 0 else float("inf")
    ckpt_bytes = sum(f.stat().st_size for f in checkpoint.iterdir() if f.is_file())
    del resumed, uninterrupted
    gc.collect()
    if on_cuda:
        torch.cuda.empty_cache()
    train = {
        "preset": cfg.preset, "latents": [cfg.micro_batch, 4, cfg.schedule.num_frames, R.latent_size(cfg),
                                          R.latent_size(cfg)],
        "parameters": params, "trainable": trainable, "parameters_by_group": by_group,
        "autocast_bf16": on_cuda, "gradient_checkpointing": True, "ema": cfg.optim.ema_decay > 0,
        "adamw_fused": fused, "build_s": round(build_s, 2), "step_s": step_s, "loss": losses,
        "peak_gib": None if peak is None else round(peak / GIB, 3), "estimate_static_gib": round(static / GIB, 3),
        "activation_gib": None if peak is None else round((peak - static) / GIB, 3),
        "gpu_total_gib": None if total is None else round(total / GIB, 3),
        "fits": None if peak is None else peak < total,
    }
    resume = {
        "checkpoint_gib": round(ckpt_bytes / GIB, 3), "save_s": round(save_s, 2), "restore_s": round(restore_s, 2),
        "restored_step": resumed_step, "state_device_problems": problems[:3],
        "max_abs_diff": {k: float(f"{v:.3g}") for k, v in diff.items()}, "step_update_max": float(f"{update:.3g}"),
        "ratio": float(f"{ratio:.3g}"), "ok": not problems and resumed_step == args.steps - 1 and ratio <= RESUME_RATIO_MAX,
    }
    return {"train": train, "resume": resume}


def check_sample(args: argparse.Namespace, device: Any, work: Path) -> dict[str, Any]:
    import numpy as np

    from fdreamer.device import inference_dtype
    from fdreamer.inference.pipeline import VideoPipeline
    from fdreamer.inference.request import VideoRequest
    from fdreamer.toy.tiny_models import make_tiny_models

    models = work / "tiny_models"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        make_tiny_models(models, allow_untrained_vae=True)
    checkpoint = models / "i2v"
    trained = (checkpoint / "fdreamer_checkpoint.json").is_file()
    if not trained:  # no committed I2V (or a random VAE): a random tiny checkpoint in the same layout
        from helpers.checkpoints import tiny_checkpoint

        checkpoint = tiny_checkpoint(work / "tiny_checkpoint", models)
    dtype = inference_dtype(device, None)
    t = time.perf_counter()
    pipe = VideoPipeline.from_checkpoint(checkpoint, device=device, dtype=dtype)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    result = pipe(VideoRequest(prompt="a red circle slides to the right over a soft grey textured background",
                               num_inference_steps=args.sample_steps, seed=1))
    seconds = time.perf_counter() - t
    frames = np.asarray(result.frames)
    return {"checkpoint": "committed tiny I2V" if trained else "random tiny", "mode": "t2v",
            "steps": args.sample_steps, "dtype": str(pipe.model.dtype).replace("torch.", ""),
            "frames": list(frames.shape), "uint8": frames.dtype == np.uint8,
            "moving": bool(np.abs(frames[-1].astype(np.int16) - frames[0].astype(np.int16)).mean() > 0),
            "load_s": round(load_s, 2), "seconds": round(seconds, 2),
            "timings": {k: round(v, 3) for k, v in result.timings.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (CI: with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="the tiny preset at its stage-1 shapes (8x16x16 latents)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps (the last one is redone after the resume)")
    parser.add_argument("--sample-steps", type=int, default=25, help="denoising steps of the sample (T2I and I2V each)")
    parser.add_argument("--workdir", default=None, help="where the checkpoint and the tiny models go (default: a temp dir)")
    args = parser.parse_args(argv)
    args.preset = "tiny" if args.tiny else "sd15"
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the checkpoint is written before the last step)")
    # cuBLAS needs this before its first call for deterministic results (the resume comparison)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    started = time.perf_counter()
    import torch

    from fdreamer.device import enable_tf32

    if not args.cpu and not torch.cuda.is_available():
        print(json.dumps({"ok": False, "error": "no CUDA device (use --cpu --tiny on a CPU machine)"}))
        return 1
    device = torch.device("cpu" if args.cpu else "cuda")
    torch.use_deterministic_algorithms(True, warn_only=True)  # the resume comparison; warns where none exists
    warnings.filterwarnings("ignore", message=".*deterministic.*")
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                           "torch": torch.__version__, "cuda": torch.version.cuda, "tf32": enable_tf32(device)}
    with tempfile.TemporaryDirectory(prefix="fdreamer-gpu-check-", dir=args.workdir) as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        out.update(check_training(args, device, work))
        out["train"]["wall_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        out["sample"] = check_sample(args, device, work)
        out["sample"]["wall_s"] = round(time.perf_counter() - t, 1)
    out["imports_ray"] = sys.modules.get("ray") is not None
    out["ok"] = bool(out["resume"]["ok"] and out["train"]["fits"] is not False and out["sample"]["uint8"]
                     and not out["imports_ray"] and all(l == l for l in out["train"]["loss"]))  # noqa: E741 - NaN check
    out["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(out), flush=True)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
