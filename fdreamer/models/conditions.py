"""Conditions of the video UNet, their null values for classifier-free guidance, and per-sample dropping.

The image condition is one thing — the conditioning first frame — seen twice: its CLIP image
embedding (adapter, Eq. 2) and its VAE latent (PACA, Eq. 3). The text condition is the caption, seen
by CLIP (spatial cross-attention) and T5 (temporal cross-attention). So dropping works per sample on
two switches:

- drop text: CLIP text tokens and T5 tokens/mask become the encoders' outputs for the empty caption
  (passed in: they come from the frozen encoders, :mod:`fdreamer.encoders`);
- drop image: the CLIP image embedding and the first-frame latent become zeros (IP-Adapter's null
  image; a zero latent is the null for PACA). The null is fixed zeros, not learned: the adapter's
  projection still maps it to learned "null image" tokens (its bias + LayerNorm).

Dropping both gives the fully unconditional input of classifier-free guidance.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch


@dataclass
class Conditions:
    """The conditioning tensors of one batch (see ``FactorizedDreamerUNet.forward``)."""

    text_tokens: torch.Tensor  # [B, L, D_text]
    image_embed: torch.Tensor | None = None  # [B, P]
    first_frame: torch.Tensor | None = None  # [B, C, h, w]
    t5_tokens: torch.Tensor | None = None  # [B, L_t5, D_t5]
    t5_mask: torch.Tensor | None = None  # bool [B, L_t5]

    @property
    def batch_size(self) -> int:
        return self.text_tokens.shape[0]

    def to(self, device: torch.device | str) -> Conditions:
        """The same conditions on ``device`` (absent ones stay None)."""
        return Conditions(**{k: None if v is None else v.to(device) for k, v in self.as_kwargs().items()})

    def as_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``model(sample, timestep, **cond.as_kwargs())``."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _rows(x: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """``x`` with a batch of 1 expanded to ``batch`` rows; other batch sizes must match."""
    if x.shape[0] == batch:
        return x
    if x.shape[0] == 1:
        return x.expand(batch, *x.shape[1:])
    raise ValueError(f"{what}: batch {x.shape[0]} is neither 1 nor {batch}")


def _fit_length(tokens: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (zeros, mask False) or cut T5 tokens to ``length``; cutting only drops padded positions."""
    n = tokens.shape[1]
    if n < length:
        pad = tokens.new_zeros(tokens.shape[0], length - n, tokens.shape[2])
        return torch.cat([tokens, pad], 1), torch.cat([mask, mask.new_zeros(mask.shape[0], length - n)], 1)
    if n > length and bool(mask[:, length:].any()):
        raise ValueError(f"null T5 tokens have real tokens beyond the batch's length {length}")
    return tokens[:, :length], mask[:, :length]


def null_conditions(
    like: Conditions,
    empty_text_tokens: torch.Tensor,
    empty_t5_tokens: torch.Tensor | None = None,
    empty_t5_mask: torch.Tensor | None = None,
) -> Conditions:
    """Null conditions shaped like ``like``: empty-caption tokens (given, batch 1 or B), zero image.

    ``empty_t5_mask`` None means every given empty-caption T5 token is real.
    """
    b = like.batch_size
    text = _rows(empty_text_tokens, b, "empty_text_tokens").to(like.text_tokens)
    if text.shape[1:] != like.text_tokens.shape[1:]:
        raise ValueError(f"empty_text_tokens {tuple(text.shape)} do not match text_tokens {tuple(like.text_tokens.shape)}")
    t5 = t5_mask = None
    if like.t5_tokens is not None:
        if empty_t5_tokens is None:
            raise ValueError("the conditions have T5 tokens: empty_t5_tokens is required")
        mask = empty_t5_mask if empty_t5_mask is not None else torch.ones(empty_t5_tokens.shape[:2], dtype=torch.bool)
        t5, t5_mask = _fit_length(empty_t5_tokens, mask.to(empty_t5_tokens.device), like.t5_tokens.shape[1])
        t5, t5_mask = _rows(t5, b, "empty_t5_tokens").to(like.t5_tokens), _rows(t5_mask, b, "empty_t5_mask")
    return Conditions(
        text_tokens=text,
        image_embed=None if like.image_embed is None else torch.zeros_like(like.image_embed),
        first_frame=None if like.first_frame is None else torch.zeros_like(like.first_frame),
        t5_tokens=t5,
        t5_mask=None if t5_mask is None else t5_mask.to(like.text_tokens.device),
    )


def _where(keep_null: torch.Tensor, null: torch.Tensor | None, x: torch.Tensor | None) -> torch.Tensor | None:
    if x is None:
        return None
    assert null is not None
    m = keep_null.to(x.device).view(-1, *([1] * (x.ndim - 1)))  # [B] -> [B, 1, ...] to broadcast over x
    return torch.where(m, null.to(x.device), x)


def drop_conditions(
    cond: Conditions, null: Conditions, drop_text: torch.Tensor, drop_image: torch.Tensor
) -> Conditions:
    """Per sample, replace the text and/or image condition by its null (bool masks ``[B]``)."""
    b = cond.batch_size
    for name, m in (("drop_text", drop_text), ("drop_image", drop_image)):
        if m.dtype != torch.bool or m.shape != (b,):
            raise ValueError(f"{name} must be a bool tensor [{b}], got {m.dtype} {tuple(m.shape)}")
    t5_mask = cond.t5_mask
    if cond.t5_tokens is not None:
        if null.t5_tokens is None or null.t5_mask is None or null.t5_tokens.shape != cond.t5_tokens.shape:
            raise ValueError("null conditions must carry T5 tokens + mask of the batch's shape (use null_conditions)")
        real = t5_mask if t5_mask is not None else torch.ones(cond.t5_tokens.shape[:2], dtype=torch.bool)
        t5_mask = _where(drop_text, null.t5_mask, real.to(cond.t5_tokens.device))
    return replace(
        cond,
        text_tokens=_where(drop_text, null.text_tokens, cond.text_tokens),
        t5_tokens=_where(drop_text, null.t5_tokens, cond.t5_tokens),
        t5_mask=t5_mask,
        image_embed=_where(drop_image, null.image_embed, cond.image_embed),
        first_frame=_where(drop_image, null.first_frame, cond.first_frame),
    )


def sample_drop_masks(
    batch: int, p_text: float = 0.05, p_image: float = 0.05, p_both: float = 0.05,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(drop_text, drop_image)`` for CFG training: exclusive events text-only / image-only / both
    with the given probabilities (IP-Adapter's 5% / 5% / 5%)."""
    if min(p_text, p_image, p_both) < 0 or p_text + p_image + p_both > 1:
        raise ValueError(f"drop probabilities must be >= 0 and sum to <= 1, got {p_text}, {p_image}, {p_both}")
    u = torch.rand(batch, generator=generator)
    text_only = u < p_text
    image_only = (u >= p_text) & (u < p_text + p_image)
    both = (u >= p_text + p_image) & (u < p_text + p_image + p_both)
    return text_only | both, image_only | both
