"""``scaling.grad_reduce_dtype``: gradients all-reduced in fp16 (or bf16 on NCCL) by the DDP comm hook that
``training/loop.py`` registers (``training/parallel.py``), on 2 real gloo processes (no Ray: the hook is
the part under test; the Ray Train path is the same ``prepare_model`` as fp32)."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from helpers.ray_cluster import free_port

from training import parallel
from training.config import ScalingSection


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))


def _input(rank: int) -> torch.Tensor:
    return torch.randn(16, 32, generator=torch.Generator().manual_seed(rank + 1)) * 3.3


def _worker(rank: int, port: int, dtype: str, out: dict) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = _model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        parallel.apply_ddp_grad_reduce(ddp, dtype)
        ddp(_input(rank)).pow(2).mean().backward()
        out[rank] = [p.grad.clone() for p in model.parameters()]
    finally:
        dist.destroy_process_group()


def test_fp16_all_reduce_on_gloo_matches_the_exact_mean_to_fp16_precision() -> None:
    with mp.get_context("spawn").Manager() as manager:
        out = manager.dict()
        mp.start_processes(_worker, args=(free_port(), "fp16", out), nprocs=2, join=True, start_method="spawn")
        half = dict(out)
    exact = []  # what an fp32 all-reduce gives: the mean of the two ranks' gradients
    for rank in (0, 1):
        model = _model()
        model(_input(rank)).pow(2).mean().backward()
        exact.append([p.grad for p in model.parameters()])
    mean = [(a + b) / 2 for a, b in zip(*exact, strict=True)]
    assert all(torch.equal(a, b) for a, b in zip(half[0], half[1], strict=True))  # every rank: the same gradient
    diffs = [float((h - e).abs().max() / e.abs().max()) for h, e in zip(half[0], mean, strict=True)]
    assert max(diffs) < 2e-3, diffs  # fp16 rounding of the reduced values
    assert max(diffs) > 1e-6, "the gradients are fp32-exact: the fp16 hook was not applied"


def test_bytes_per_step_halve() -> None:
    model = torch.nn.Linear(100, 10)
    assert parallel.grad_bytes_per_step(model, "fp32") == 1010 * 4
    assert parallel.grad_bytes_per_step(model, "bf16") == parallel.grad_bytes_per_step(model, "fp16") == 1010 * 2


def test_bf16_needs_gpu_workers_and_fsdp_gets_reduce_dtype() -> None:
    with pytest.raises(ValueError, match="bf16 needs GPU workers"):
        ScalingSection(grad_reduce_dtype="bf16", use_gpu=False)
    assert ScalingSection(grad_reduce_dtype="bf16", use_gpu=True).grad_reduce_dtype == "bf16"
    assert parallel.fsdp_kwargs("bf16")["mixed_precision"].reduce_dtype == torch.bfloat16
    assert "mixed_precision" not in parallel.fsdp_kwargs("fp32")
