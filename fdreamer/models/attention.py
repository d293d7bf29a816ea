"""Attention kernels and the small building blocks shared by the temporal, adapter and PACA layers.

:func:`attention` is the single entry point of every attention the video model adds (and of the
spatial attention processors it installs): torch ``F.scaled_dot_product_attention`` by default,
xformers' memory-efficient attention when it is installed, the tensors are on CUDA and no mask is
given (the import is guarded; xformers is never required). Norms compute in float32 and cast back, so
the model is bf16-safe; nothing here uses float64.
"""

from __future__ import annotations

import importlib.util
import math
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

BACKENDS = ("auto", "sdpa", "xformers")


@lru_cache(maxsize=1)
def _xformers_ops() -> Any | None:
    """``xformers.ops`` if installed, else None (imported once, lazily)."""
    if importlib.util.find_spec("xformers") is None:
        return None
    try:
        import xformers.ops as xops  # type: ignore[import-not-found]
    except (ImportError, OSError, RuntimeError):  # a broken install must not break SDPA users
        return None
    return xops


def xformers_available() -> bool:
    """Whether xformers can be imported."""
    return _xformers_ops() is not None


def check_backend(backend: str) -> None:
    """Raise early for an unknown backend, or 'xformers' without xformers installed."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "xformers" and not xformers_available():
        raise ValueError("attention_backend='xformers' but xformers is not installed; use 'auto' or 'sdpa'")


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, backend: str = "auto"
) -> torch.Tensor:
    """Multi-head attention ``softmax(q kᵀ/√d) v`` on ``[B, heads, L, d]`` tensors.

    ``mask`` is a bool tensor broadcastable to ``[B, heads, Lq, Lk]`` (True = attend) or None. xformers
    is used for ``backend`` 'auto'/'xformers' when installed, on CUDA, without a mask; otherwise SDPA.
    """
    if backend != "sdpa" and mask is None and q.is_cuda:
        xops = _xformers_ops()
        if xops is not None:
            # 'b h l d -> b l h d' (xformers layout) and back
            out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def group_norm_fp32(x: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """``norm(x)`` computed in float32 and cast back to ``x.dtype`` (bf16/fp16-safe statistics)."""
    w = norm.weight.float() if norm.weight is not None else None
    b = norm.bias.float() if norm.bias is not None else None
    return F.group_norm(x.float(), norm.num_groups, w, b, norm.eps).to(x.dtype)


def layer_norm_fp32(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """``norm(x)`` computed in float32 and cast back to ``x.dtype``."""
    w = norm.weight.float() if norm.weight is not None else None
    b = norm.bias.float() if norm.bias is not None else None
    return F.layer_norm(x.float(), norm.normalized_shape, w, b, norm.eps).to(x.dtype)


def frame_position_encoding(frames: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Sinusoidal encoding of the frame index, ``[frames, dim]`` (Transformer/AnimateDiff style).

    ``pe[t, 2i] = sin(t / 10000^(2i/dim))``, ``pe[t, 2i+1] = cos(...)``; computed in float32, any
    number of frames (no maximum), no parameters.
    """
    pos = torch.arange(frames, device=device, dtype=torch.float32)[:, None]
    half = (dim + 1) // 2
    freq = torch.exp(torch.arange(half, device=device, dtype=torch.float32) * (-2.0 * math.log(10000.0) / dim))
    angles = pos * freq[None, :]  # [frames, half]
    pe = torch.stack([angles.sin(), angles.cos()], dim=-1)  # [frames, half, 2]
    pe = rearrange(pe, "f n two -> f (n two)")[:, :dim]
    return pe.to(dtype)


class MultiHeadAttention(nn.Module):
    """Attention with its own q/k/v/out projections (no q/k/v bias), for the layers the video model adds.

    ``context_dim`` None = self-attention. ``zero_out`` initialises the output projection to zero so the
    layer starts as the identity inside a residual connection.
    """

    def __init__(
        self, dim: int, heads: int, context_dim: int | None = None, zero_out: bool = False, backend: str = "auto"
    ) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        check_backend(backend)
        self.heads = heads
        self.attention_backend = backend
        kv_dim = dim if context_dim is None else context_dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(kv_dim, dim, bias=False)
        self.to_v = nn.Linear(kv_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        if zero_out:
            nn.init.zeros_(self.to_out.weight)
            nn.init.zeros_(self.to_out.bias)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x`` [N, Lq, dim], ``context`` [N, Lk, context_dim] or None, ``mask`` bool [N, Lk] -> [N, Lq, dim]."""
        ctx = x if context is None else context
        if ctx.shape[0] != x.shape[0]:
            raise ValueError(f"attention: query batch {x.shape[0]} != context batch {ctx.shape[0]}")
        if ctx.shape[-1] != self.to_k.in_features:
            raise ValueError(f"attention: context width {ctx.shape[-1]}, expected {self.to_k.in_features}")
        # 'n l (h d) -> n h l d' for q, k, v
        q = rearrange(self.to_q(x), "n l (h d) -> n h l d", h=self.heads)
        k = rearrange(self.to_k(ctx), "n l (h d) -> n h l d", h=self.heads)
        v = rearrange(self.to_v(ctx), "n l (h d) -> n h l d", h=self.heads)
        attn_mask = None
        if mask is not None:
            if mask.shape != ctx.shape[:2] or mask.dtype != torch.bool:
                raise ValueError(f"attention mask must be bool {tuple(ctx.shape[:2])}, got {mask.dtype} {tuple(mask.shape)}")
            attn_mask = rearrange(mask, "n l -> n 1 1 l")
        out = attention(q, k, v, attn_mask, self.attention_backend)
        return self.to_out(rearrange(out, "n h l d -> n l (h d)"))


class CaptionTail(nn.Module):
    """Base of the temporal blocks (:class:`~fdreamer.models.temporal.TemporalTransformer`,
    :class:`~fdreamer.models.swap.SwapTransformer`): their shared input checks and their shared tail,
    cross-attention on the motion caption + feed-forward + zero-initialised ``proj_out``.

    A subclass builds its own layers first, then calls :meth:`init_caption_tail` (so the random
    initialisation order, and the attribute names ``norm2, cross_attn, norm3, ff, proj_out`` of the
    state dict, are those of a block that wrote them out itself).
    """

    def init_caption_tail(self, channels: int, heads: int, context_dim: int, ff_mult: int, backend: str) -> None:
        self.context_dim = context_dim
        self.norm2 = nn.LayerNorm(channels)
        self.cross_attn = MultiHeadAttention(channels, heads, context_dim=context_dim, backend=backend)
        self.norm3 = nn.LayerNorm(channels)
        self.ff = nn.Sequential(
            nn.Linear(channels, channels * ff_mult), nn.GELU(), nn.Linear(channels * ff_mult, channels)
        )
        self.proj_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def check_inputs(self, x: torch.Tensor, frames: int, context: torch.Tensor) -> int:
        """Validate ``x`` [(b f), c, h, w] and ``context`` [b, L, context_dim]; return ``b``."""
        if x.ndim != 4 or frames < 1 or x.shape[0] % frames != 0:
            raise ValueError(f"{type(self).__name__}: expected [(b f), c, h, w] with f={frames}, got {tuple(x.shape)}")
        b = x.shape[0] // frames
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != self.context_dim:
            raise ValueError(f"temporal context must be [{b}, L, {self.context_dim}], got {tuple(context.shape)}")
        return b

    def caption_tail(self, tokens: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``tokens`` [b, N, c] (every query of one sample) -> ``proj_out(u + FF(u))`` with
        ``u = tokens + CrossAttn(tokens <- context)``, [b, N, c]; ``mask`` bool [b, L] (True = token)."""
        u = tokens + self.cross_attn(layer_norm_fp32(tokens, self.norm2), context, mask)
        u = u + self.ff(layer_norm_fp32(u, self.norm3))
        return self.proj_out(u)
