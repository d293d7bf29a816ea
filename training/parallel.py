"""Gradient all-reduce precision of the training workers (``scaling.grad_reduce_dtype``), apart from the loop.

DDP reduces gradients in their own dtype (fp32) unless a communication hook casts them: torch's
``fp16_compress_hook`` / ``bf16_compress_hook`` cast each bucket, all-reduce it and cast back, halving the
bytes on the wire (the division by the world size happens before the cast). FSDP takes the same choice as
``MixedPrecision(reduce_dtype=...)``. torch's bf16 hook needs NCCL; fp16 also runs on gloo.
"""

from __future__ import annotations

from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def apply_ddp_grad_reduce(ddp_model: torch.nn.parallel.DistributedDataParallel, dtype: str) -> None:
    """Register the compress hook of ``dtype`` on a DDP model (fp32: nothing to do)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    hooks = {"bf16": default_hooks.bf16_compress_hook, "fp16": default_hooks.fp16_compress_hook}
    if dtype in hooks:
        ddp_model.register_comm_hook(None, hooks[dtype])
    elif dtype != "fp32":
        raise ValueError(f"grad_reduce_dtype must be one of {list(DTYPES)}, got {dtype!r}")


def fsdp_kwargs(dtype: str) -> dict[str, Any]:
    """FSDP constructor arguments for ``dtype`` (``use_orig_params`` always, ``mixed_precision`` when not fp32)."""
    kwargs: dict[str, Any] = {"use_orig_params": True}
    if dtype != "fp32":
        from torch.distributed.fsdp import MixedPrecision

        kwargs["mixed_precision"] = MixedPrecision(reduce_dtype=DTYPES[dtype])
    return kwargs


def grad_bytes_per_step(model: torch.nn.Module, dtype: str) -> int:
    """Bytes of one all-reduce of the trainable gradients in ``dtype`` (what each worker sends and receives,
    up to the ring's 2(n-1)/n factor)."""
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return n * DTYPES[dtype].itemsize
