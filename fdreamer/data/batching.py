"""Preprocessed Parquet rows -> training tensors (no Ray: used by the Ray Train loop, benchmarks, evaluation).

A batch arrives as columns (a dict of numpy arrays, pyarrow's ``to_pydict`` lists, or a pandas frame):
tensor columns are bytes + shape + dtype (:mod:`fdreamer.data.schema`). T5 tokens are stored unpadded;
here they are right-padded to the longest caption of the batch with a boolean mask.

Joint image-video training (VideoCrafter2): image rows are the preprocessed rows with ``num_frames``
= 1 (video profiles need >= 2). :func:`to_train_batch` with ``image=True`` decodes them as 1-frame
clips ``[B, 4, 1, h, w]`` with the text condition only (``is_image``: the model runs them with the
temporal layers bypassed and no image condition — the image itself must not condition its own
reconstruction). A :class:`JointBatch` is one micro-batch of both parts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fdreamer.data.schema import decode_tensor
from fdreamer.models.conditions import Conditions



@dataclass
class TrainBatch:
    """One micro-batch: clean latents, their conditions, optional flow targets and the clip ids."""

    latents: torch.Tensor  # [B, 4, T, h, w] float32 (T = 1 for images)
    cond: Conditions
    flow: torch.Tensor | None  # [B, 2, T-1, h, w] or None
    clip_ids: list[str]
    fps: torch.Tensor | None = None  # [B] float32, frames per second of the sampled clips (when read)
    is_image: bool = False  # 1-frame image rows: temporal layers bypassed, text condition only

    def to(self, device: torch.device | str) -> TrainBatch:
        return TrainBatch(self.latents.to(device), self.cond.to(device), None if self.flow is None else self.flow.to(device),
                          self.clip_ids, None if self.fps is None else self.fps.to(device), self.is_image)


@dataclass
class JointBatch:
    """One micro-batch of joint image-video training: ``video`` clips and ``image`` rows (either may be None)."""

    video: TrainBatch | None
    image: TrainBatch | None

    def __post_init__(self) -> None:
        if self.video is None and self.image is None:
            raise ValueError("JointBatch needs a video part, an image part or both")
        if self.video is not None and self.video.is_image:
            raise ValueError("JointBatch.video holds image rows (is_image=True)")
        if self.image is not None and not self.image.is_image:
            raise ValueError("JointBatch.image must hold image rows (to_train_batch(..., image=True))")

    @property
    def parts(self) -> list[TrainBatch]:
        return [p for p in (self.video, self.image) if p is not None]

    @property
    def clip_ids(self) -> list[str]:
        return [i for p in self.parts for i in p.clip_ids]

    @property
    def num_samples(self) -> int:
        return sum(p.latents.shape[0] for p in self.parts)

    def to(self, device: torch.device | str) -> JointBatch:
        return JointBatch(*(None if p is None else p.to(device) for p in (self.video, self.image)))


def _column(batch: Mapping[str, Any], name: str) -> Sequence[Any]:
    if name not in batch:
        raise KeyError(f"batch has no column {name!r} (columns: {sorted(batch)[:12]}...)")
    return batch[name]


def decode_tensor_column(batch: Mapping[str, Any], name: str) -> list[np.ndarray]:
    """Every row's ``name`` tensor as a numpy array (bytes + shape + dtype columns, :func:`schema.decode_tensor`)."""
    data, shapes, dtypes = (_column(batch, n) for n in (name, f"{name}_shape", f"{name}_dtype"))
    return [decode_tensor(raw, shape, dtype, name) for raw, shape, dtype in zip(data, shapes, dtypes, strict=True)]


def stack_column(batch: Mapping[str, Any], name: str) -> torch.Tensor:
    """``name`` of every row stacked to a float32 tensor ``[B, ...]`` (all rows must share a shape)."""
    arrays = decode_tensor_column(batch, name)
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"{name}: rows have different shapes {sorted(shapes)}; filter the data to one profile")
    return torch.from_numpy(np.stack(arrays).astype(np.float32))


def pad_tokens(seqs: Sequence[np.ndarray | torch.Tensor], min_length: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The one T5 padding helper: right-pad ``[L_i, D]`` sequences to ``[B, max L, D]`` plus a bool mask
    ``[B, max L]``. numpy inputs give float32 on the CPU; tensors keep the first one's dtype and device."""
    if not seqs:
        raise ValueError("pad_tokens: no sequences")
    dims = {s.shape[1] for s in seqs}
    if len(dims) != 1:
        raise ValueError(f"token widths differ: {sorted(dims)}")
    ts = [s if isinstance(s, torch.Tensor) else torch.from_numpy(np.array(s, dtype=np.float32)) for s in seqs]
    length = max(min_length, max(s.shape[0] for s in ts))
    tokens = ts[0].new_zeros(len(ts), length, dims.pop())
    mask = torch.zeros(len(ts), length, dtype=torch.bool, device=ts[0].device)
    for i, s in enumerate(ts):
        tokens[i, : s.shape[0]] = s
        mask[i, : s.shape[0]] = True
    return tokens, mask


def _fps(batch: Mapping[str, Any]) -> torch.Tensor | None:
    if "fps" not in batch:
        return None
    return torch.tensor(np.asarray(batch["fps"], dtype=np.float32))  # [B] (a copy: the column may be read-only)


def to_train_batch(
    batch: Mapping[str, Any], *, with_flow: bool = False, with_t5: bool = True, image: bool = False,
    with_image: bool = True,
) -> TrainBatch:
    """Decode one batch of schema rows into a :class:`TrainBatch` (``image``: 1-frame image rows).

    ``with_t5=False`` (temporal layers on CLIP text, Table 4 (c)) leaves out the T5 tokens and
    ``with_image=False`` (direct T2V, Table 4 (b)) the first-frame conditions: the model rejects
    conditions it has no layers for.
    """
    if image:
        latents = stack_column(batch, "latents")  # [B, 4, T, h, w]
        if latents.shape[2] != 1:
            raise ValueError(f"image rows must have 1 frame, got latents {tuple(latents.shape)}; "
                             "image data = the num_frames == 1 rows of an image-manifest preprocessing output")
        cond = Conditions(text_tokens=stack_column(batch, "clip_text_tokens"))  # [B, L, D_text]
        return TrainBatch(latents, cond, None, [str(c) for c in _column(batch, "clip_id")], _fps(batch), True)
    t5 = mask = None
    if with_t5:
        t5, mask = pad_tokens(decode_tensor_column(batch, "t5"))
    cond = Conditions(
        text_tokens=stack_column(batch, "clip_text_tokens"),  # [B, L, D_text]
        image_embed=stack_column(batch, "clip_image_embed") if with_image else None,  # [B, P]
        first_frame=stack_column(batch, "first_latent") if with_image else None,  # [B, 4, h, w]
        t5_tokens=t5,
        t5_mask=mask,
    )
    flow = stack_column(batch, "flow") if with_flow else None
    return TrainBatch(stack_column(batch, "latents"), cond, flow, [str(c) for c in _column(batch, "clip_id")],
                      _fps(batch))


def null_from_tensors(null: Mapping[str, torch.Tensor]) -> Conditions:
    """The empty-caption conditions (batch 1) from a preprocess job's ``null_conditions`` tensors."""
    t5 = null["t5"].float()[None]  # [1, L, D]
    return Conditions(
        text_tokens=null["clip_text_tokens"].float()[None],  # [1, L, D_text]
        t5_tokens=t5,
        t5_mask=torch.ones(t5.shape[:2], dtype=torch.bool),
    )


__all__ = [
    "JointBatch", "TrainBatch", "decode_tensor_column",
    "null_from_tensors", "pad_tokens", "stack_column", "to_train_batch",
]
