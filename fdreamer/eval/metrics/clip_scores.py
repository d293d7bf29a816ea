"""CLIP Frame Consistency (FC) and Prompt Consistency (PC), as in Emu Video and paper Table 3.

Both are *raw* cosine similarities in [-1, 1] (not multiplied by 100):

- FC (paper Table 3): the mean cosine similarity between the CLIP image embeddings of
  consecutive frames, ``mean_t cos(e_t, e_{t+1})`` (``pair_mode="consecutive"``), or of every
  unordered pair of distinct frames, ``mean_{i<j} cos(e_i, e_j)`` (``pair_mode="all"``).
- PC (paper Table 3): the mean cosine similarity between each frame's CLIP image embedding and the
  prompt's projected CLIP text embedding, ``mean_t cos(e_t, p)``.

The encoder is anything with ``encode_clip_image(images) -> [B, P]`` and
``encode_clip_text_embeds(texts) -> [B, P]``: a :class:`fdreamer.encoders.FrozenEncoders`
(real CLIP ViT-B/32 from a local folder via :func:`load_clip`, or the tiny CLIP of
``fdreamer make-tiny-models``), or :class:`ClipCallables` wrapping two plain functions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from fdreamer.eval.metrics._validate import check_video

PAIR_MODES = ("consecutive", "all")


@runtime_checkable
class ClipEncoder(Protocol):
    """What the CLIP metrics need: projected image and text embeddings (any scale; they are normalised)."""

    def encode_clip_image(self, images: np.ndarray) -> Any:  # uint8 [B, H, W, 3] -> [B, P]
        ...

    def encode_clip_text_embeds(self, texts: Sequence[str]) -> Any:  # list of B str -> [B, P]
        ...


@dataclass
class ClipCallables:
    """A :class:`ClipEncoder` from two callables (``text_fn`` may be None if only FC is needed)."""

    image_fn: Callable[[np.ndarray], Any]
    text_fn: Callable[[Sequence[str]], Any] | None = None

    def encode_clip_image(self, images: np.ndarray) -> Any:
        return self.image_fn(images)

    def encode_clip_text_embeds(self, texts: Sequence[str]) -> Any:
        if self.text_fn is None:
            raise ValueError("this ClipCallables has no text_fn; prompt consistency needs one")
        return self.text_fn(texts)


def load_clip(path: str | Path, *, device: str = "cpu", dtype: str = "float32") -> Any:
    """Frozen full CLIP (e.g. a local snapshot of ``openai/clip-vit-base-patch32``) as FrozenEncoders.

    The folder must hold ``config.json``, the weights, the tokenizer files and
    ``preprocessor_config.json``; nothing is downloaded.
    """
    from fdreamer.encoders import EncoderConfig, FrozenEncoders

    return FrozenEncoders.load(EncoderConfig(clip=str(path), device=device, dtype=dtype), ["clip"])


def _check_encoder(encoder: object, need_text: bool) -> None:
    names = ["encode_clip_image"] + (["encode_clip_text_embeds"] if need_text else [])
    missing = [n for n in names if not callable(getattr(encoder, n, None))]
    if missing:
        raise TypeError(
            f"encoder {type(encoder).__name__} lacks {', '.join(missing)}; pass a FrozenEncoders or a ClipCallables"
        )


def _as_matrix(emb: Any, rows: int, what: str) -> np.ndarray:
    """Embeddings as float64 ``[rows, P]``, L2-normalised."""
    if isinstance(emb, torch.Tensor):
        emb = emb.detach().to("cpu", torch.float32).numpy()
    arr = np.asarray(emb, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != rows:
        raise ValueError(f"{what} must return [{rows}, P] embeddings, got shape {list(arr.shape)}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} returned non-finite embeddings")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{what} returned an all-zero embedding; its cosine is undefined")
    return arr / norms


def frame_embeddings(video: np.ndarray, encoder: ClipEncoder, *, batch_size: int = 32) -> np.ndarray:
    """L2-normalised CLIP image embeddings ``[T, P]`` (float64) of uint8 ``[T, H, W, 3]``, ``batch_size`` frames at a time."""
    check_video(video)
    _check_encoder(encoder, need_text=False)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    parts = []
    for start in range(0, video.shape[0], batch_size):
        chunk = np.ascontiguousarray(video[start:start + batch_size])
        with torch.no_grad():
            out = encoder.encode_clip_image(chunk)
        parts.append(_as_matrix(out, len(chunk), "encode_clip_image"))
    return np.concatenate(parts)


def text_embedding(prompt: str, encoder: ClipEncoder) -> np.ndarray:
    """L2-normalised projected CLIP text embedding ``[P]`` (float64) of one prompt."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError("prompt is empty")
    _check_encoder(encoder, need_text=True)
    with torch.no_grad():
        out = encoder.encode_clip_text_embeds([prompt])
    return _as_matrix(out, 1, "encode_clip_text_embeds")[0]


def frame_consistency_from_embeddings(emb: np.ndarray, pair_mode: str = "consecutive") -> float:
    """FC (paper Table 3) of normalised embeddings ``[T, P]``: mean cosine of consecutive (or all distinct) pairs."""
    if pair_mode not in PAIR_MODES:
        raise ValueError(f"pair_mode must be one of {PAIR_MODES}, got {pair_mode!r}")
    if emb.ndim != 2 or emb.shape[0] < 2:
        raise ValueError(f"frame consistency needs at least 2 frame embeddings [T, P], got shape {list(emb.shape)}")
    if pair_mode == "consecutive":
        return float(np.mean(np.sum(emb[:-1] * emb[1:], axis=1)))
    sims = emb @ emb.T  # [T, T]
    i, j = np.triu_indices(emb.shape[0], k=1)
    return float(np.mean(sims[i, j]))


def frame_consistency(
    video: np.ndarray, encoder: ClipEncoder, *, pair_mode: str = "consecutive", batch_size: int = 32
) -> float:
    """Frame Consistency (paper Table 3; Emu Video): mean raw cosine similarity of CLIP image
    embeddings of consecutive frames (``pair_mode="consecutive"``) or of all distinct frame pairs
    (``pair_mode="all"``). Identical frames give exactly 1. ``video``: uint8 ``[T>=2, H, W, 3]``.
    """
    if pair_mode not in PAIR_MODES:
        raise ValueError(f"pair_mode must be one of {PAIR_MODES}, got {pair_mode!r}")
    check_video(video, min_frames=2)
    return frame_consistency_from_embeddings(frame_embeddings(video, encoder, batch_size=batch_size), pair_mode)


def prompt_consistency(video: np.ndarray, prompt: str, encoder: ClipEncoder, *, batch_size: int = 32) -> float:
    """Prompt Consistency (paper Table 3; Emu Video): mean over frames of the raw cosine similarity
    between the frame's CLIP image embedding and the prompt's projected CLIP text embedding.
    """
    check_video(video)
    text = text_embedding(prompt, encoder)
    emb = frame_embeddings(video, encoder, batch_size=batch_size)
    if emb.shape[1] != text.shape[0]:
        raise ValueError(f"image embeddings have {emb.shape[1]} dims but the text embedding has {text.shape[0]}")
    return float(np.mean(emb @ text))


def clip_scores(
    video: np.ndarray, prompt: str | None, encoder: ClipEncoder, *, pair_mode: str = "consecutive",
    batch_size: int = 32,
) -> dict[str, float]:
    """``{"fc": FC, "pc": PC}`` (paper Table 3) with the frames encoded once; ``pc`` is omitted if ``prompt`` is None."""
    if pair_mode not in PAIR_MODES:
        raise ValueError(f"pair_mode must be one of {PAIR_MODES}, got {pair_mode!r}")
    check_video(video, min_frames=2)
    emb = frame_embeddings(video, encoder, batch_size=batch_size)
    out = {"fc": frame_consistency_from_embeddings(emb, pair_mode)}
    if prompt is not None:
        text = text_embedding(prompt, encoder)
        if emb.shape[1] != text.shape[0]:
            raise ValueError(f"image embeddings have {emb.shape[1]} dims but the text embedding has {text.shape[0]}")
        out["pc"] = float(np.mean(emb @ text))
    return out
