"""Pixel-aware cross-attention (PACA, from PASD), paper §3.2, Eq. 3.

    Z = PACA(to_q(x), to_kv(y))

``x`` is the up-path hidden state, ``y`` the VAE latent of the conditioning first frame. A small
trainable :class:`PacaEncoder` (a strided conv stack) brings ``y`` to every up-block's resolution and
channel count; after each ResNet of each up-sampling block a :class:`PacaLayer` lets every pixel of
every frame attend to the feature map of ``y`` at that resolution (flattened ``b c h w -> b (h w) c``,
as PASD does). The layers are residual; with ``init='zero'`` their output projections start at 0.

PASD's attention carries no position: a pixel cannot tell which of ``y``'s tokens lies under it. Two
pixel-aligned options (``ModelConfig.first_frame``) keep the paper's PACA and add what SVD-style models have:

- ``paca_pos``: fixed 2-D sinusoidal encodings of each pixel's (row, column), normalised to the map's
  size, added to the queries' and the keys' inputs (:func:`position_encoding_2d`);
- ``concat``: ``frame_in``, a zero-initialised 3×3 conv of the first-frame latent added to the output of
  the UNet's ``conv_in`` for every frame (= extra zero-initialised ``conv_in`` input channels).
"""

from __future__ import annotations

import itertools

import torch
from diffusers import UNet2DConditionModel
from einops import rearrange
from torch import nn

from fdreamer.models.attention import MultiHeadAttention, layer_norm_fp32


class PacaEncoder(nn.Module):
    """First-frame latent ``[B, C_lat, h, w]`` -> one feature map per UNet resolution level.

    Level ``l`` has ``channels[l]`` channels at ``h / 2^l`` (stride-2 3×3 convs, the same output sizes
    as the UNet's ``Downsample2D``), so level ``l`` matches the up-block that works at that level.
    """

    def __init__(self, latent_channels: int, channels: list[int] | tuple[int, ...]) -> None:
        super().__init__()
        self.latent_channels = latent_channels
        self.conv_in = nn.Conv2d(latent_channels, channels[0], 3, padding=1)
        levels: list[nn.Module] = [nn.Sequential(nn.SiLU(), nn.Conv2d(channels[0], channels[0], 3, padding=1))]
        for prev, ch in itertools.pairwise(channels):
            levels.append(
                nn.Sequential(
                    nn.SiLU(), nn.Conv2d(prev, ch, 3, stride=2, padding=1), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1)
                )
            )
        self.levels = nn.ModuleList(levels)

    def forward(self, y: torch.Tensor) -> list[torch.Tensor]:
        """Features ``[B, channels[l], h_l, w_l]`` for every level ``l`` (0 = full latent resolution)."""
        if y.ndim != 4 or y.shape[1] != self.latent_channels:
            raise ValueError(f"first_frame must be [B, {self.latent_channels}, h, w], got {tuple(y.shape)}")
        h = self.conv_in(y)
        feats = []
        for level in self.levels:
            h = level(h)
            feats.append(h)
        return feats


def position_encoding_2d(h: int, w: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """``[h*w, dim]`` sinusoidal encodings of (row, column) normalised to [0, 1] (a pixel of a 16×16 map and
    the one at the same place of another 16×16 map get the same code); half the channels for rows, half for
    columns, ``sin``/``cos`` at frequencies ``pi * 2^k`` (flattened row-major like ``b c h w -> b (h w) c``)."""
    if dim < 4:
        raise ValueError(f"position_encoding_2d needs dim >= 4, got {dim}")
    quarter = dim // 4
    freqs = torch.pi * 2.0 ** torch.arange(quarter, device=device, dtype=torch.float32)  # [quarter]
    rows = torch.linspace(0, 1, h, device=device) if h > 1 else torch.zeros(1, device=device)
    cols = torch.linspace(0, 1, w, device=device) if w > 1 else torch.zeros(1, device=device)

    def code(x: torch.Tensor) -> torch.Tensor:  # [n] -> [n, 2*quarter]
        a = x[:, None] * freqs[None]
        return torch.cat([a.sin(), a.cos()], dim=1)

    r = code(rows)[:, None, :].expand(h, w, 2 * quarter)
    c = code(cols)[None, :, :].expand(h, w, 2 * quarter)
    pe = torch.cat([r, c], dim=-1).reshape(h * w, 4 * quarter)  # [(h w), 4*quarter]
    return nn.functional.pad(pe, (0, dim - 4 * quarter))


class PacaLayer(nn.Module):
    """Residual PACA (Eq. 3) at one up-path position: every pixel of every frame attends to ``y``'s tokens.
    ``positions``: add :func:`position_encoding_2d` to the normalised queries and keys (``paca_pos``)."""

    def __init__(self, channels: int, y_channels: int, heads: int, init: str = "zero", backend: str = "auto",
                 positions: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.norm_y = nn.LayerNorm(y_channels)
        self.positions = positions
        self.attn = MultiHeadAttention(channels, heads, context_dim=y_channels, zero_out=init == "zero", backend=backend)

    def forward(self, x: torch.Tensor, frames: int, y_feat: torch.Tensor) -> torch.Tensor:
        """``x`` [(b f), c, h, w], ``y_feat`` [b, c_y, h_y, w_y] -> same shape as ``x``."""
        if x.ndim != 4 or x.shape[0] % frames != 0:
            raise ValueError(f"PacaLayer: expected [(b f), c, h, w] with f={frames}, got {tuple(x.shape)}")
        b, _, hh, ww = x.shape[0] // frames, *x.shape[1:]
        if y_feat.ndim != 4 or y_feat.shape[0] != b:
            raise ValueError(f"PacaLayer: y features must be [{b}, c, h, w], got {tuple(y_feat.shape)}")
        # queries do not interact in cross-attention: one sequence per sample, no copy of y per frame
        q = rearrange(x, "(b f) c h w -> b (f h w) c", f=frames)
        ctx = rearrange(y_feat, "b c h w -> b (h w) c")
        q, ctx = layer_norm_fp32(q, self.norm), layer_norm_fp32(ctx, self.norm_y)
        if self.positions:
            pe_q = position_encoding_2d(hh, ww, q.shape[-1], q.device).to(q.dtype)  # [(h w), c]
            q = q + pe_q.repeat(frames, 1)[None]  # the same code for a pixel in every frame: [1, (f h w), c]
            ctx = ctx + position_encoding_2d(*y_feat.shape[2:], ctx.shape[-1], ctx.device).to(ctx.dtype)[None]
        out = self.attn(q, ctx)
        return x + rearrange(out, "b (f h w) c -> (b f) c h w", f=frames, h=hh, w=ww)


def unet_heads(unet: UNet2DConditionModel) -> list[int]:
    """Attention heads per resolution level, as ``UNet2DConditionModel`` derives them from its config."""
    cfg = unet.config
    heads = cfg.num_attention_heads or cfg.attention_head_dim
    levels = len(cfg.block_out_channels)
    return list(heads) if isinstance(heads, (list, tuple)) else [int(heads)] * levels


class Paca(nn.Module):
    """The PACA encoder and one :class:`PacaLayer` after each resnet of each up block (``up[i][j]``)."""

    def __init__(self, unet: UNet2DConditionModel, init: str = "zero", backend: str = "auto",
                 first_frame: str = "paca") -> None:
        super().__init__()
        channels = list(unet.config.block_out_channels)
        heads = unet_heads(unet)
        levels = len(channels)
        self.encoder = PacaEncoder(unet.config.out_channels, channels)
        self.frame_in: nn.Conv2d | None = None
        if first_frame == "concat":  # beside conv_in: the first-frame latent at every frame, zero at init
            self.frame_in = nn.Conv2d(unet.config.out_channels, unet.conv_in.out_channels, 3, padding=1)
            nn.init.zeros_(self.frame_in.weight)
            nn.init.zeros_(self.frame_in.bias)
        up = []
        for i, block in enumerate(unet.up_blocks):
            level = levels - 1 - i
            up.append(
                nn.ModuleList(
                    PacaLayer(r.out_channels, channels[level], heads[level], init, backend,
                              positions=first_frame == "paca_pos") for r in block.resnets
                )
            )
        self.up = nn.ModuleList(up)
        self.up_levels = [levels - 1 - i for i in range(len(unet.up_blocks))]

    def features(self, first_frame: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features ordered like the up blocks: ``out[i]`` feeds ``up[i]``."""
        feats = self.encoder(first_frame)
        return [feats[level] for level in self.up_levels]
