"""Temporal layers of the video UNet (paper §3.2; VideoLDM / AnimateDiff style).

After every spatial ResNet block: a :class:`TemporalConv` (1-D convolutions over the frame axis).
After every spatial transformer: a :class:`TemporalTransformer` (self-attention over frames with a
sinusoidal frame position encoding, cross-attention on the motion caption's T5 tokens — or CLIP tokens
for Table 4 (c) — and a feed-forward). Both are residual with a zero-initialised output projection, so
a fresh video model reproduces the image model frame by frame.

``temporal.block='swap'`` replaces each :class:`TemporalTransformer` by VideoFactory's
:class:`~fdreamer.models.swap.SwapTransformer` (numbered in walk order down → mid → up); the
:class:`TemporalConv` layers stay.

Inputs and outputs are in the spatial layers' layout ``[(b f), c, h, w]`` (frames folded into the
batch); each layer unfolds the frame axis itself.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from einops import rearrange
from torch import nn

from fdreamer.models.attention import (
    CaptionTail,
    MultiHeadAttention,
    frame_position_encoding,
    group_norm_fp32,
    layer_norm_fp32,
)
from fdreamer.models.config import TemporalConfig
from fdreamer.models.swap import SwapTransformer


class TemporalConv(nn.Module):
    """Residual temporal convolution: (GroupNorm, SiLU, Conv over frames) × 2, last conv zero-init.

    The convolutions are ``Conv3d`` with kernel ``(k, 1, 1)`` on ``[b, c, f, h, w]``: a 1-D convolution
    over the frame axis at every pixel (zero-padded at the clip ends), without reshaping to ``(b h w)``.
    """

    def __init__(self, channels: int, groups: int, kernel: int = 3) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels, eps=1e-6)
        self.conv1 = nn.Conv3d(channels, channels, (kernel, 1, 1), padding=(kernel // 2, 0, 0))
        self.norm2 = nn.GroupNorm(groups, channels, eps=1e-6)
        self.conv2 = nn.Conv3d(channels, channels, (kernel, 1, 1), padding=(kernel // 2, 0, 0))
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """``x`` [(b f), c, h, w] -> same shape."""
        if x.ndim != 4 or frames < 1 or x.shape[0] % frames != 0:
            raise ValueError(f"TemporalConv: expected [(b f), c, h, w] with f={frames}, got {tuple(x.shape)}")
        h = rearrange(x, "(b f) c h w -> b c f h w", f=frames)
        h = self.conv1(F.silu(group_norm_fp32(h, self.norm1)))
        h = self.conv2(F.silu(group_norm_fp32(h, self.norm2)))
        return x + rearrange(h, "b c f h w -> (b f) c h w")


class TemporalTransformer(CaptionTail):
    """Residual temporal transformer: frame self-attention, text cross-attention, feed-forward.

    The cross-attention has no interaction between queries, so instead of repeating the text tokens for
    every spatial position (``(b h w)`` sequences of ``f`` frames), all ``h·w·f`` queries of one sample
    attend to that sample's tokens in one call — the same result without copying the keys/values.
    """

    def __init__(
        self, channels: int, heads: int, context_dim: int, groups: int, ff_mult: int = 4, backend: str = "auto"
    ) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.norm1 = nn.LayerNorm(channels)
        self.self_attn = MultiHeadAttention(channels, heads, backend=backend)
        self.init_caption_tail(channels, heads, context_dim, ff_mult, backend)

    def forward(
        self, x: torch.Tensor, frames: int, context: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x`` [(b f), c, h, w]; ``context`` [b, L, context_dim]; ``mask`` bool [b, L] (True = token)."""
        b = self.check_inputs(x, frames, context)
        _, _, hh, ww = x.shape
        # GroupNorm statistics over all frames of a clip (as AnimateDiff), keeping inter-frame differences
        h = group_norm_fp32(rearrange(x, "(b f) c h w -> b c f h w", f=frames), self.norm)
        h = rearrange(h, "b c f h w -> (b h w) f c")
        h = self.proj_in(h)
        pe = frame_position_encoding(frames, h.shape[-1], h.device, h.dtype)  # [f, c]
        h = h + self.self_attn(layer_norm_fp32(h, self.norm1) + pe)
        hq = rearrange(h, "(b hw) f c -> b (hw f) c", b=b)  # a view: every query of one sample
        out = self.caption_tail(hq, context, mask)  # [b, (h w f), c]
        return x + rearrange(out, "b (h w f) c -> (b f) c h w", h=hh, w=ww, f=frames)


class TemporalBlock(nn.Module):
    """The temporal layers of one spatial block: ``res[j]`` after resnet j, ``attn[j]`` after transformer j."""

    def __init__(self, res: list[TemporalConv], attn: list[TemporalTransformer | SwapTransformer]) -> None:
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)


class TemporalLayers(nn.Module):
    """All temporal layers, mirroring the UNet: ``down[i]``, ``mid``, ``up[i]``."""

    def __init__(self, down: list[TemporalBlock], mid: TemporalBlock, up: list[TemporalBlock]) -> None:
        super().__init__()
        self.down = nn.ModuleList(down)
        self.mid = mid
        self.up = nn.ModuleList(up)


def _block(
    spatial: nn.Module, cfg: TemporalConfig, context_dim: int, backend: str, swap_index: itertools.count
) -> TemporalBlock:
    res = [TemporalConv(r.out_channels, r.norm2.num_groups, cfg.conv_kernel) for r in spatial.resnets]
    attn: list[TemporalTransformer | SwapTransformer] = []
    for t in getattr(spatial, "attentions", None) or []:
        heads = t.transformer_blocks[0].attn1.heads
        if cfg.block == "swap":
            attn.append(SwapTransformer(
                t.in_channels, heads, context_dim, t.norm.num_groups, next(swap_index), cfg.window, cfg.ff_mult, backend
            ))
        else:
            attn.append(TemporalTransformer(t.in_channels, heads, context_dim, t.norm.num_groups, cfg.ff_mult, backend))
    return TemporalBlock(res, attn)


def build_temporal_layers(
    unet: UNet2DConditionModel, cfg: TemporalConfig, context_dim: int, backend: str = "auto"
) -> TemporalLayers:
    """Temporal layers for every resnet and transformer of ``unet`` (channels/heads/groups read from it).

    Swap blocks are numbered in the order the walk calls them (down, mid, up; the arguments below are
    evaluated in that order), which fixes their query branch.
    """
    swap_index = itertools.count()
    return TemporalLayers(
        [_block(b, cfg, context_dim, backend, swap_index) for b in unet.down_blocks],
        _block(unet.mid_block, cfg, context_dim, backend, swap_index),
        [_block(b, cfg, context_dim, backend, swap_index) for b in unet.up_blocks],
    )
