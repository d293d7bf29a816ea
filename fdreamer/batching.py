"""Preprocessed Parquet rows -> training tensors (no Ray: used by the Ray Train loop, benchmarks, evaluation).

A batch arrives as columns (a dict of numpy arrays, pyarrow's ``to_pydict`` lists, or a pandas frame):
tensor columns are bytes + shape + dtype (:mod:`fdreamer.data.schema`). T5 tokens are stored unpadded;
here they are right-padded to the longest caption of the batch with a boolean mask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fdreamer.models.conditions import Conditions

#: Columns the training loop reads (column selection at read time); ``flow`` only when it is used.
TRAIN_COLUMNS: tuple[str, ...] = (
    "clip_id", "latents", "latents_shape", "latents_dtype", "first_latent", "first_latent_shape",
    "first_latent_dtype", "clip_image_embed", "clip_image_embed_shape", "clip_image_embed_dtype",
    "clip_text_tokens", "clip_text_tokens_shape", "clip_text_tokens_dtype", "t5", "t5_shape", "t5_dtype",
)
FLOW_COLUMNS: tuple[str, ...] = ("flow", "flow_shape", "flow_dtype")


@dataclass
class TrainBatch:
    """One micro-batch: clean latents, their conditions, optional flow targets and the clip ids."""

    latents: torch.Tensor  # [B, 4, T, h, w] float32
    cond: Conditions
    flow: torch.Tensor | None  # [B, 2, T-1, h, w] or None
    clip_ids: list[str]

    def to(self, device: torch.device | str) -> TrainBatch:
        c = self.cond
        cond = Conditions(*(None if v is None else v.to(device) for v in
                            (c.text_tokens, c.image_embed, c.first_frame, c.t5_tokens, c.t5_mask)))
        return TrainBatch(self.latents.to(device), cond, None if self.flow is None else self.flow.to(device),
                          self.clip_ids)


def _column(batch: Mapping[str, Any], name: str) -> Sequence[Any]:
    if name not in batch:
        raise KeyError(f"batch has no column {name!r} (columns: {sorted(batch)[:12]}...)")
    return batch[name]


def decode_tensor_column(batch: Mapping[str, Any], name: str) -> list[np.ndarray]:
    """Every row's ``name`` tensor as a numpy array (bytes + shape + dtype columns)."""
    data, shapes, dtypes = (_column(batch, n) for n in (name, f"{name}_shape", f"{name}_dtype"))
    out = []
    for raw, shape, dtype in zip(data, shapes, dtypes, strict=True):
        shape = tuple(int(s) for s in shape)
        arr = np.frombuffer(raw, dtype=np.dtype(dtype))
        if arr.size != int(np.prod(shape)):
            raise ValueError(f"{name}: {arr.size} values do not fill shape {list(shape)}")
        out.append(arr.reshape(shape))
    return out


def stack_column(batch: Mapping[str, Any], name: str) -> torch.Tensor:
    """``name`` of every row stacked to a float32 tensor ``[B, ...]`` (all rows must share a shape)."""
    arrays = decode_tensor_column(batch, name)
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"{name}: rows have different shapes {sorted(shapes)}; filter the data to one profile")
    return torch.from_numpy(np.stack(arrays).astype(np.float32))


def pad_tokens(seqs: Sequence[np.ndarray], min_length: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``[L_i, D]`` sequences to ``[B, max L, D]`` float32 plus a bool mask ``[B, max L]``."""
    if not seqs:
        raise ValueError("pad_tokens: no sequences")
    dims = {s.shape[1] for s in seqs}
    if len(dims) != 1:
        raise ValueError(f"token widths differ: {sorted(dims)}")
    length = max(min_length, max(s.shape[0] for s in seqs))
    tokens = torch.zeros(len(seqs), length, dims.pop())
    mask = torch.zeros(len(seqs), length, dtype=torch.bool)
    for i, s in enumerate(seqs):
        tokens[i, : s.shape[0]] = torch.from_numpy(s.astype(np.float32))
        mask[i, : s.shape[0]] = True
    return tokens, mask


def to_train_batch(batch: Mapping[str, Any], *, with_flow: bool = False, with_t5: bool = True) -> TrainBatch:
    """Decode one batch of schema rows into a :class:`TrainBatch`."""
    t5 = mask = None
    if with_t5:
        t5, mask = pad_tokens(decode_tensor_column(batch, "t5"))
    cond = Conditions(
        text_tokens=stack_column(batch, "clip_text_tokens"),  # [B, L, D_text]
        image_embed=stack_column(batch, "clip_image_embed"),  # [B, P]
        first_frame=stack_column(batch, "first_latent"),  # [B, 4, h, w]
        t5_tokens=t5,
        t5_mask=mask,
    )
    flow = stack_column(batch, "flow") if with_flow else None
    return TrainBatch(stack_column(batch, "latents"), cond, flow, [str(c) for c in _column(batch, "clip_id")])


def null_from_tensors(null: Mapping[str, torch.Tensor]) -> Conditions:
    """The empty-caption conditions (batch 1) from a preprocess job's ``null_conditions`` tensors."""
    t5 = null["t5"].float()[None]  # [1, L, D]
    return Conditions(
        text_tokens=null["clip_text_tokens"].float()[None],  # [1, L, D_text]
        t5_tokens=t5,
        t5_mask=torch.ones(t5.shape[:2], dtype=torch.bool),
    )


__all__ = [
    "FLOW_COLUMNS", "TRAIN_COLUMNS", "TrainBatch", "decode_tensor_column", "null_from_tensors", "pad_tokens",
    "stack_column", "to_train_batch",
]
