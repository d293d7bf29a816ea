"""VideoFactory's swapped spatiotemporal cross-attention (Wang et al. 2023, "Swap Attention in
Spatiotemporal Diffusions for Text-to-Video Generation") as an alternative temporal block.

Selected with ``temporal.block: swap`` (:class:`~fdreamer.models.config.TemporalConfig`): every
:class:`~fdreamer.models.temporal.TemporalTransformer` (the layer after each spatial transformer) is
replaced by a :class:`SwapTransformer`; the :class:`~fdreamer.models.temporal.TemporalConv` after each
ResNet stays. The paper publishes no code; the choices made here:

- **Branches.** The *spatial* branch ``s`` is the spatial transformer's output, normalised (GroupNorm
  over all frames of a clip) and projected per pixel (``proj_in``); no extra spatial layer, the spatial
  work was just done by the SD transformer. The *temporal* branch is ``t = s + SelfAttn_frames(s)``:
  self-attention over the frames at each pixel with the sinusoidal frame encoding, as the factorized
  block does.
- **Swapped 3D-window cross-attention.** ``u = q + WindowCrossAttn(q ← kv)`` with ``(q, kv) = (s, t)`` in
  even blocks and ``(t, s)`` in odd blocks. The block index is global, counting the swap blocks in the
  order the UNet walk calls them: down blocks → mid block → up blocks, and transformer ``j`` within a
  block (block 0 = spatial query). The PredictNet's copy of the up path keeps the indices of the layers
  it was copied from.
- **Windows.** Non-overlapping ``[all frames × window × window]`` latent pixels (``temporal.window``,
  default 4): every query attends to the ``f·window²`` keys of its own window, nothing across windows.
  When ``h`` or ``w`` is not a multiple of ``window`` (e.g. SD at 320×512: a 5×8 latent in the mid
  block) the features are zero-padded at the bottom/right and the padded keys are masked out, so the
  result is the same as with smaller edge windows; padded queries are cropped. No size is rejected.
- **Position inside a window.** Parameter-free, added after the LayerNorms to queries and keys/values:
  the sinusoidal frame encoding (all channels) plus a 2-D sinusoidal encoding of the pixel's row/column
  inside the window (first half of the channels: row, second half: column), as in MAE/ViT-2D.
- **Text.** Then the same motion-caption cross-attention as the factorized block (T5 tokens, or CLIP
  for Table 4 (c), with the padding mask), then a feed-forward — so the two blocks differ only in the
  swap step and are comparable.
- **Zero init.** ``proj_out`` is zero-initialised and the block is residual (``x + proj_out(...)``),
  so a fresh model equals the image model frame by frame (and a fresh factorized model), exactly as for
  the factorized block; parameters live under ``temporal.*`` -> group ``temporal`` (frozen by
  ``freeze: [temporal]``).
- **Cost vs the factorized block.** Extra parameters per block: one attention (``4c² + c``) and two
  LayerNorms (``4c``). Extra compute per token: the 4 projections plus attention scores over
  ``f·window²`` keys instead of ``f`` (16× the temporal self-attention's score FLOPs at window 4);
  with padding the attention has a mask, which disables the xformers path (SDPA is used).

Layouts: the block takes and returns the spatial layers' ``[(b f), c, h, w]``; inside it works on
``[b, f, h, w, c]`` (channels last, so the per-pixel linear layers apply directly).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from fdreamer.models.attention import (
    CaptionTail,
    MultiHeadAttention,
    frame_position_encoding,
    group_norm_fp32,
    layer_norm_fp32,
)

QUERY_BRANCHES = ("spatial", "temporal")


def query_branch(index: int) -> str:
    """Branch feeding the queries of swap block ``index``: 'spatial' when even, 'temporal' when odd."""
    if index < 0:
        raise ValueError(f"swap block index must be >= 0, got {index}")
    return QUERY_BRANCHES[index % 2]


def window_position_encoding(
    frames: int, window: int, dim: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """``[frames, window, window, dim]``: frame encoding + 2-D (row | column) encoding inside a window."""
    pe_f = frame_position_encoding(frames, dim, device, torch.float32)  # [f, dim]
    half = dim // 2
    pe_y = frame_position_encoding(window, half, device, torch.float32)  # [window, half]
    pe_x = frame_position_encoding(window, dim - half, device, torch.float32)  # [window, dim - half]
    pix = torch.cat(
        [repeat(pe_y, "y c -> y x c", x=window), repeat(pe_x, "x c -> y x c", y=window)], dim=-1
    )  # [window, window, dim]
    pe = rearrange(pe_f, "f c -> f 1 1 c") + rearrange(pix, "y x c -> 1 y x c")
    return pe.to(dtype)


class WindowCrossAttention(nn.Module):
    """Cross-attention inside non-overlapping 3-D windows ``[all frames × window × window]``.

    Returns only the attention output (no residual): ``query`` attends to ``kv`` of its own window.
    """

    def __init__(self, channels: int, heads: int, window: int, backend: str = "auto") -> None:
        super().__init__()
        if window < 1:
            raise ValueError(f"swap attention window must be >= 1, got {window}")
        self.channels = channels
        self.window = window
        self.norm_q = nn.LayerNorm(channels)
        self.norm_kv = nn.LayerNorm(channels)
        self.attn = MultiHeadAttention(channels, heads, backend=backend)  # keys/values have width c too

    def forward(self, query: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """``query``, ``kv`` [b, f, h, w, c] -> [b, f, h, w, c]."""
        if query.ndim != 5 or query.shape[-1] != self.channels:
            raise ValueError(
                f"WindowCrossAttention: query must be [b, f, h, w, {self.channels}], got {tuple(query.shape)}"
            )
        if kv.shape != query.shape:
            raise ValueError(
                f"WindowCrossAttention: kv shape {tuple(kv.shape)} != query shape {tuple(query.shape)}"
            )
        b, f, h, w, c = query.shape
        win = self.window
        pad_h, pad_w = (-h) % win, (-w) % win
        q = layer_norm_fp32(query, self.norm_q)
        k = layer_norm_fp32(kv, self.norm_kv)
        if pad_h or pad_w:  # F.pad pads the last dims first: (c: 0, 0), (w: 0, pad_w), (h: 0, pad_h)
            q = F.pad(q, (0, 0, 0, pad_w, 0, pad_h))  # [b, f, h + pad_h, w + pad_w, c]
            k = F.pad(k, (0, 0, 0, pad_w, 0, pad_h))
        pe = window_position_encoding(f, win, c, q.device, q.dtype)  # [f, win, win, c]
        pattern = "b f (nh wh) (nw ww) c -> (b nh nw) f wh ww c"
        q = rearrange(q, pattern, wh=win, ww=win) + pe  # [(b nh nw), f, win, win, c]
        k = rearrange(k, pattern, wh=win, ww=win) + pe
        q = rearrange(q, "n f wh ww c -> n (f wh ww) c")  # one sequence of f·win² tokens per window
        k = rearrange(k, "n f wh ww c -> n (f wh ww) c")
        mask = None
        if pad_h or pad_w:
            valid = torch.zeros(h + pad_h, w + pad_w, dtype=torch.bool, device=q.device)
            valid[:h, :w] = True
            valid = rearrange(valid, "(nh wh) (nw ww) -> (nh nw) wh ww", wh=win, ww=win)
            mask = repeat(valid, "n wh ww -> (b n) (f wh ww)", b=b, f=f)  # [(b nh nw), f·win²], True = real
        out = self.attn(q, k, mask)  # [(b nh nw), f·win², c]
        out = rearrange(
            out, "(b nh nw) (f wh ww) c -> b f (nh wh) (nw ww) c",
            b=b, nh=(h + pad_h) // win, f=f, wh=win, ww=win,
        )
        return out[:, :, :h, :w]


class FrameSelfAttention(nn.Module):
    """The temporal branch: ``s + SelfAttn(LN(s) + frame PE)`` over the frames at each pixel."""

    def __init__(self, channels: int, heads: int, backend: str = "auto") -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.attn = MultiHeadAttention(channels, heads, backend=backend)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        """``s`` [b, f, h, w, c] -> [b, f, h, w, c]."""
        b, f, h, w, c = s.shape
        seq = rearrange(s, "b f h w c -> (b h w) f c")
        pe = frame_position_encoding(f, c, s.device, s.dtype)  # [f, c]
        seq = seq + self.attn(layer_norm_fp32(seq, self.norm) + pe)
        return rearrange(seq, "(b h w) f c -> b f h w c", b=b, h=h, w=w)


class SwapTransformer(CaptionTail):
    """Residual swap block: branches, swapped window cross-attention, text cross-attention, FF.

    ``index`` is the block's global position among the swap blocks (walk order down → mid → up); it
    fixes :attr:`query_branch` ('spatial' for even, 'temporal' for odd indices).
    """

    def __init__(
        self, channels: int, heads: int, context_dim: int, groups: int, index: int, window: int = 4,
        ff_mult: int = 4, backend: str = "auto",
    ) -> None:
        super().__init__()
        self.index = index
        self.query_branch = query_branch(index)
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)  # output = the spatial branch s
        self.temporal_branch = FrameSelfAttention(channels, heads, backend)  # output = the temporal branch t
        self.swap_attn = WindowCrossAttention(channels, heads, window, backend)
        self.init_caption_tail(channels, heads, context_dim, ff_mult, backend)  # text cross-attn, FF, proj_out

    def extra_repr(self) -> str:
        return f"index={self.index}, query_branch={self.query_branch!r}, window={self.swap_attn.window}"

    def forward(
        self, x: torch.Tensor, frames: int, context: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x`` [(b f), c, h, w]; ``context`` [b, L, context_dim]; ``mask`` bool [b, L] (True = token)."""
        self.check_inputs(x, frames, context)
        _, _, hh, ww = x.shape
        # GroupNorm statistics over all frames of a clip, as the factorized block
        h = group_norm_fp32(rearrange(x, "(b f) c h w -> b c f h w", f=frames), self.norm)
        s = self.proj_in(rearrange(h, "b c f h w -> b f h w c"))  # spatial branch [b, f, h, w, c]
        t = self.temporal_branch(s)  # temporal branch [b, f, h, w, c]
        q, kv = (s, t) if self.query_branch == "spatial" else (t, s)
        u = q + self.swap_attn(q, kv)  # [b, f, h, w, c]
        uq = rearrange(u, "b f h w c -> b (f h w) c")  # every query of one sample vs its text tokens
        out = self.caption_tail(uq, context, mask)  # [b, (f h w), c]
        return x + rearrange(out, "b (f h w) c -> (b f) c h w", f=frames, h=hh, w=ww)
