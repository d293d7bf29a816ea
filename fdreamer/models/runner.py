"""The walk through the spatial UNet with temporal layers (and PACA) inserted — shared by the video
UNet and the PredictNet (which runs a copy of the up path on the same skip features).

All hidden states here are in the spatial layout ``[(b f), c, h, w]``. The spatial layers are the
diffusers UNet's own modules (``ResnetBlock2D``, ``Transformer2DModel``, ``Downsample2D``,
``Upsample2D``), called one by one in the order ``UNet2DConditionModel.forward`` calls them; each is
followed by its temporal layer:

- ResNet  -> [PACA, up blocks only] -> :class:`TemporalConv`
- Transformer (spatial self-attn, cross-attn with the Eq. 2 adapter) -> :class:`TemporalTransformer`

With gradient checkpointing each such unit is recomputed in backward.

``StepContext.temporal = False`` bypasses every temporal layer (the image path of joint image-video
training): the units then run the spatial layer (and PACA, when features are given) only — the
temporal modules are not called, so they neither change the output nor enter the autograd graph.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class StepContext:
    """Per-forward inputs that every layer may read."""

    frames: int
    emb: torch.Tensor  # time embedding [(b f), E]
    spatial_context: torch.Tensor  # CLIP text tokens (+ adapter image tokens) [(b f), L, D]
    temporal_context: torch.Tensor | None  # T5 (or CLIP) tokens [b, L_t, D_t]; None when temporal=False
    temporal_mask: torch.Tensor | None  # bool [b, L_t], True = real token
    paca_features: list[torch.Tensor] | None  # per up block [b, c_i, h_i, w_i]
    forward_upsample_size: bool  # latent size not a multiple of 2**num_upsamplers
    checkpoint: bool
    temporal: bool = True  # False: skip every temporal layer (images / per-frame spatial UNet)


def _call(ctx: StepContext, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    if ctx.checkpoint and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _resnet_unit(
    resnet: nn.Module, tconv: nn.Module | None, paca: nn.Module | None, h: torch.Tensor, emb: torch.Tensor,
    frames: int, y_feat: torch.Tensor | None,
) -> torch.Tensor:
    h = resnet(h, emb)
    if paca is not None:
        h = paca(h, frames, y_feat)  # Eq. 3
    return h if tconv is None else tconv(h, frames)  # None: temporal layers bypassed


def _attn_unit(
    attn: nn.Module, tattn: nn.Module | None, h: torch.Tensor, spatial_ctx: torch.Tensor,
    temporal_ctx: torch.Tensor | None, temporal_mask: torch.Tensor | None, frames: int,
) -> torch.Tensor:
    h = attn(h, encoder_hidden_states=spatial_ctx, return_dict=False)[0]  # Eq. 1 / Eq. 2
    return h if tattn is None else tattn(h, frames, temporal_ctx, temporal_mask)  # None: bypassed


def _resnet(ctx: StepContext, resnet: nn.Module, tconv: nn.Module, h: torch.Tensor,
            paca: nn.Module | None = None, y_feat: torch.Tensor | None = None) -> torch.Tensor:
    tconv_or_none = tconv if ctx.temporal else None
    return _call(ctx, partial(_resnet_unit, resnet, tconv_or_none, paca), h, ctx.emb, ctx.frames, y_feat)


def _attn(ctx: StepContext, attn: nn.Module, tattn: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return _call(
        ctx, partial(_attn_unit, attn, tattn if ctx.temporal else None), h, ctx.spatial_context,
        ctx.temporal_context, ctx.temporal_mask, ctx.frames,
    )


def run_down(
    down_blocks: nn.ModuleList, temporal_down: nn.ModuleList, h: torch.Tensor, ctx: StepContext
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Down path from the ``conv_in`` output; returns the hidden state and all skip features."""
    skips = [h]
    for block, tblock in zip(down_blocks, temporal_down):
        attentions = getattr(block, "attentions", None)
        for j, resnet in enumerate(block.resnets):
            h = _resnet(ctx, resnet, tblock.res[j], h)
            if attentions is not None:
                h = _attn(ctx, attentions[j], tblock.attn[j], h)
            skips.append(h)
        if block.downsamplers is not None:
            for down in block.downsamplers:
                h = down(h)
            skips.append(h)
    return h, skips


def run_mid(mid: nn.Module, tblock: nn.Module, h: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    """Mid block: resnet, then (transformer, resnet) pairs."""
    h = _resnet(ctx, mid.resnets[0], tblock.res[0], h)
    for j, (attn, resnet) in enumerate(zip(mid.attentions, mid.resnets[1:])):
        h = _attn(ctx, attn, tblock.attn[j], h)
        h = _resnet(ctx, resnet, tblock.res[j + 1], h)
    return h


def run_up(
    up_blocks: nn.ModuleList,
    temporal_up: nn.ModuleList,
    paca_up: nn.ModuleList | None,
    h: torch.Tensor,
    skips: list[torch.Tensor],
    ctx: StepContext,
) -> torch.Tensor:
    """Up path from the mid-block output, consuming ``skips`` (not modified) like the diffusers UNet."""
    skips = list(skips)
    last = len(up_blocks) - 1
    for i, (block, tblock) in enumerate(zip(up_blocks, temporal_up)):
        n = len(block.resnets)
        res, skips = skips[-n:], skips[:-n]
        upsample_size = skips[-1].shape[2:] if (i != last and ctx.forward_upsample_size) else None
        attentions = getattr(block, "attentions", None)
        y_feat = ctx.paca_features[i] if (paca_up is not None and ctx.paca_features is not None) else None
        for j, resnet in enumerate(block.resnets):
            h = torch.cat([h, res.pop()], dim=1)  # skip connection on channels
            paca = paca_up[i][j] if y_feat is not None else None
            h = _resnet(ctx, resnet, tblock.res[j], h, paca, y_feat)
            if attentions is not None:
                h = _attn(ctx, attentions[j], tblock.attn[j], h)
        if block.upsamplers is not None:
            for up in block.upsamplers:
                h = up(h, upsample_size)
    return h
