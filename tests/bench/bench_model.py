"""Benchmark: forward+backward time and peak memory of the video UNet, with and without gradient
checkpointing. Not a test (no timed assertions anywhere); prints ONE JSON line.

    python tests/bench/bench_model.py [--preset tiny] [--batch 2] [--frames 8] [--size 16] [--predictnet]

Each variant runs in a fresh subprocess so its peak memory is its own:

- CUDA: ``torch.cuda.max_memory_allocated`` over the timed steps, minus the memory held before them;
- CPU: peak RSS (``ru_maxrss``) minus the RSS before the first step (warm-up included: same workload);
- both: ``saved_activations_mb``, the bytes autograd keeps for backward outside checkpointed regions
  (unique storages, parameters excluded) — the quantity checkpointing trades for recomputation.

Timings: median over ``--steps`` after ``--warmup`` steps; ``train_step_s`` adds an AdamW step.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _inputs(cfg: Any, args: argparse.Namespace, device: torch.device, text_dim: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    b, f, s = args.batch, args.frames, args.size
    d: dict[str, Any] = {
        "sample": torch.randn(b, 4, f, s, s, generator=g),
        "timestep": torch.randint(0, 1000, (b,), generator=g),
        "text_tokens": torch.randn(b, 77, text_dim, generator=g),
    }
    if cfg.factorized:
        d["image_embed"] = torch.randn(b, cfg.image_embed_dim, generator=g)
        d["first_frame"] = torch.randn(b, 4, s, s, generator=g)
    if cfg.temporal_text_encoder == "t5":
        d["t5_tokens"] = torch.randn(b, 24, cfg.t5_dim, generator=g)
        d["t5_mask"] = torch.ones(b, 24, dtype=torch.bool)
    return {k: v.to(device) for k, v in d.items()}


def _variant(args: argparse.Namespace) -> dict[str, Any]:
    from fdreamer.models import FactorizedDreamerUNet, preset_model_config

    device = torch.device(args.device)
    cfg = preset_model_config(args.preset, predictnet=args.predictnet, gradient_checkpointing=args.variant == "ckpt")
    model = FactorizedDreamerUNet.from_preset(args.preset, cfg, seed=0).to(device).train()
    d = _inputs(cfg, args, device, model.cross_attention_dim)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def loss_fn() -> torch.Tensor:
        out = model(**d)
        loss = out.sample.float().square().mean()
        return loss + out.flow.float().square().mean() if out.flow is not None else loss

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    rss0 = _rss_mb()
    for _ in range(args.warmup):
        loss_fn().backward()
        model.zero_grad(set_to_none=True)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss_fn().backward()
        sync()
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        peak_mb, source = (torch.cuda.max_memory_allocated() - base) / 2**20, "cuda.max_memory_allocated-delta"
    else:
        peak_mb, source = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0, "ru_maxrss-delta"
    train = []
    for _ in range(max(2, args.steps // 2)):
        t0 = time.perf_counter()
        loss_fn().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        train.append(time.perf_counter() - t0)

    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen and ptr not in param_ptrs:
            seen.add(ptr)
            saved += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    loss.backward()
    return {
        "step_s": round(statistics.median(times), 4),
        "step_s_min": round(min(times), 4),
        "train_step_s": round(statistics.median(train), 4),
        "peak_mem_mb": round(peak_mb, 1),
        "mem_source": source,
        "saved_activations_mb": round(saved / 2**20, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=("tiny", "sd15"))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=16, help="latent height = width")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--predictnet", action="store_true", help="include the PredictNet (final training stage)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variant", choices=("plain", "ckpt"), help=argparse.SUPPRESS)  # child process
    args = p.parse_args(argv)
    if args.variant:
        print(json.dumps(_variant(args)))
        return 0
    results = {}
    for variant in ("plain", "ckpt"):
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--variant", variant]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    plain, ckpt = results["plain"], results["ckpt"]

    def ratio(key: str) -> float | None:
        return round(ckpt[key] / plain[key], 3) if plain[key] else None

    print(json.dumps({
        "bench": "video_unet_forward_backward", "preset": args.preset, "device": args.device,
        "batch": args.batch, "frames": args.frames, "latent": [args.size, args.size], "predictnet": args.predictnet,
        "torch_threads": torch.get_num_threads(),
        "no_checkpointing": plain, "checkpointing": ckpt,
        "ratio_ckpt_over_plain": {k: ratio(k) for k in ("step_s", "peak_mem_mb", "saved_activations_mb")},
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
