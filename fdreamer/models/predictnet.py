"""PredictNet (paper §3.2, Eq. 4): optical-flow supervision of the video UNet, ControlNet-style.

A trainable copy of the video UNet's up-sampling path (spatial up blocks with their adapter
processors, temporal layers and PACA layers — initialised from the current weights) runs on the same
mid-block output and skip features as the UNet. Its ``conv_norm_out`` is copied; ``conv_out`` is
replaced by a head that looks at each consecutive pair of frames and predicts 2 flow channels per pair
at latent resolution: ``[B, 2, T-1, h, w]``. It is trained with ``L_flow`` (Eq. 4,
:func:`fdreamer.train.losses.flow_loss`) and never runs at inference.
"""

from __future__ import annotations

import copy

import torch
from diffusers import UNet2DConditionModel
from einops import rearrange
from torch import nn

from fdreamer.models.runner import StepContext, run_up


class FlowHead(nn.Module):
    """Features of frames t and t+1, concatenated on channels -> ``flow_channels`` (conv, SiLU, conv)."""

    def __init__(self, channels: int, flow_channels: int = 2) -> None:
        super().__init__()
        self.channels = channels
        self.conv1 = nn.Conv2d(2 * channels, channels, 3, padding=1)
        self.act = nn.SiLU()
        self.conv2 = nn.Conv2d(channels, flow_channels, 3, padding=1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """``feats`` [B, c, T, h, w] -> flow [B, flow_channels, T-1, h, w]."""
        if feats.ndim != 5 or feats.shape[1] != self.channels or feats.shape[2] < 2:
            raise ValueError(f"FlowHead: expected [B, {self.channels}, T>=2, h, w], got {tuple(feats.shape)}")
        b = feats.shape[0]
        pairs = torch.cat([feats[:, :, :-1], feats[:, :, 1:]], dim=1)  # [b, 2c, T-1, h, w]
        x = rearrange(pairs, "b c f h w -> (b f) c h w")
        flow = self.conv2(self.act(self.conv1(x)))
        return rearrange(flow, "(b f) c h w -> b c f h w", b=b)


class PredictNet(nn.Module):
    """Copy of the video up path + :class:`FlowHead`."""

    def __init__(
        self,
        unet: UNet2DConditionModel,
        temporal_up: nn.ModuleList,
        paca_up: nn.ModuleList | None,
        flow_channels: int = 2,
    ) -> None:
        super().__init__()
        self.up_blocks = copy.deepcopy(unet.up_blocks)
        self.temporal_up = copy.deepcopy(temporal_up)
        self.paca_up = copy.deepcopy(paca_up) if paca_up is not None else None
        self.conv_norm_out = copy.deepcopy(unet.conv_norm_out)
        self.act = nn.SiLU()
        self.head = FlowHead(unet.config.block_out_channels[0], flow_channels)

    def forward(self, mid: torch.Tensor, skips: list[torch.Tensor], ctx: StepContext) -> torch.Tensor:
        """Mid-block output and skip features [(b f), c, h, w] -> flow [B, 2, T-1, h, w] (Eq. 4's p_θ)."""
        h = run_up(self.up_blocks, self.temporal_up, self.paca_up, mid, skips, ctx)
        if self.conv_norm_out is not None:
            h = self.act(self.conv_norm_out(h))
        return self.head(rearrange(h, "(b f) c h w -> b c f h w", f=ctx.frames))
