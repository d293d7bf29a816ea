"""Gradient all-reduce precision of the training workers (``scaling.grad_reduce_dtype``), apart from the loop.

DDP reduces gradients in their own dtype (fp32) unless a communication hook casts them: torch's
``fp16_compress_hook`` / ``bf16_compress_hook`` cast each bucket, all-reduce it and cast back, halving the
bytes on the wire (the division by the world size happens before the cast). FSDP takes the same choice as
``MixedPrecisionPolicy(reduce_dtype=...)`` (FSDP2, what the loop uses; ``MixedPrecision`` for FSDP1).
torch's bf16 DDP hook needs NCCL; fp16 also runs on gloo, and FSDP2 reduce-scatters fp16 and bf16 on gloo.

FSDP2 (``torch.distributed.fsdp.fully_shard``) is applied here, not by ``ray.train.torch.prepare_model``
(whose FSDP path is FSDP1 and GPU-only): :func:`apply_fsdp` shards every unit the video UNet's walk calls
(``fdreamer/models/runner.py``: spatial resnets and transformers, their temporal layers, the PACA layers
of the up path), then the root (embeddings, conv in/out, samplers, adapter projection, PredictNet).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def unwrap(model: Any) -> Any:
    """The model inside a DDP wrapper (``.module``); an FSDP2-sharded or plain model as it is."""
    return getattr(model, "module", model)


def apply_ddp_grad_reduce(ddp_model: torch.nn.parallel.DistributedDataParallel, dtype: str) -> None:
    """Register the compress hook of ``dtype`` on a DDP model (fp32: nothing to do)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    hooks = {"bf16": default_hooks.bf16_compress_hook, "fp16": default_hooks.fp16_compress_hook}
    if dtype in hooks:
        ddp_model.register_comm_hook(None, hooks[dtype])
    elif dtype != "fp32":
        raise ValueError(f"grad_reduce_dtype must be one of {list(DTYPES)}, got {dtype!r}")


def fsdp_kwargs(dtype: str) -> dict[str, Any]:
    """FSDP1 (``FullyShardedDataParallel``) constructor arguments for ``dtype`` (``use_orig_params`` always,
    ``mixed_precision`` when not fp32), for code that wraps with FSDP1; the training loop uses FSDP2
    (:func:`apply_fsdp`, :func:`fsdp_mp_policy`)."""
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


def fsdp_mp_policy(dtype: str) -> Any:
    """FSDP2 ``MixedPrecisionPolicy``: parameters and compute in their own dtype, gradients reduced in ``dtype``."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if dtype not in DTYPES:
        raise ValueError(f"grad_reduce_dtype must be one of {list(DTYPES)}, got {dtype!r}")
    return MixedPrecisionPolicy(reduce_dtype=DTYPES[dtype])


def fsdp_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of a ``FactorizedDreamerUNet`` that its forward calls one by one (each becomes one FSDP
    unit: its parameters are gathered just before it runs and freed after)."""
    unet, units = model.unet, []
    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        units += [*block.resnets, *(getattr(block, "attentions", None) or [])]
    temporal = model.temporal
    for tblock in [*temporal.down, temporal.mid, *temporal.up]:
        units += [m for m in (*tblock.res, *tblock.attn) if m is not None]
    if model.paca is not None:
        units += [m for row in model.paca.up for m in row if m is not None]
    return [u for u in units if any(p.numel() for p in u.parameters())]


def apply_fsdp(model: torch.nn.Module, dtype: str) -> torch.nn.Module:
    """Shard ``model`` in place with FSDP2 over the default process group (every rank holds 1/world of each
    parameter as a ``DTensor``); returns it (now also an ``FSDPModule``)."""
    from torch.distributed.fsdp import fully_shard

    policy = fsdp_mp_policy(dtype)
    for unit in fsdp_units(model):
        fully_shard(unit, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


@contextlib.contextmanager
def fsdp_no_sync(model: Any) -> Iterator[None]:
    """FSDP2's ``no_sync``: accumulate unsharded gradients locally, reduce-scatter on the next synced backward."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
