"""Which rows and columns a training stage reads from the preprocessing job's shards (no torch).

Scores are columns of the data (``motion_score``, ``split``, ``num_frames``): a stage selects rows with
:func:`row_mask` at read time instead of deleting anything. This module imports only pyarrow and numpy;
the read plan (``training/order.py``), the workers' reader (``training/stream.py``) and the torch batches
(``training/data.py``) build on it.

Two kinds of rows: video clips (``num_frames >= 2``) and images (``num_frames == 1``, VideoCrafter2 joint
training).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fdreamer.data.schema import SCHEMA_VERSION

#: Columns the training loop reads (column selection at read time); ``flow`` only when it is used.
TRAIN_COLUMNS: tuple[str, ...] = (
    "clip_id", "latents", "latents_shape", "latents_dtype", "first_latent", "first_latent_shape",
    "first_latent_dtype", "clip_image_embed", "clip_image_embed_shape", "clip_image_embed_dtype",
    "clip_text_tokens", "clip_text_tokens_shape", "clip_text_tokens_dtype", "t5", "t5_shape", "t5_dtype", "fps",
)
#: Columns of image rows (no first frame / CLIP image embedding / T5: the image path reads text only).
IMAGE_COLUMNS: tuple[str, ...] = (
    "clip_id", "latents", "latents_shape", "latents_dtype", "clip_text_tokens", "clip_text_tokens_shape",
    "clip_text_tokens_dtype",
)
FLOW_COLUMNS: tuple[str, ...] = ("flow", "flow_shape", "flow_dtype")
#: Read for the row filters only, dropped after them.
FILTER_COLUMNS: tuple[str, ...] = ("split", "motion_score", "num_frames", "schema_version")
VIDEO, IMAGE = "video", "image"


class DataError(ValueError):
    """The training data is missing or does not fit this code / this run's configuration."""


@dataclass(frozen=True)
class SplitRule:
    """Which values of the ``split`` column a stream selects: rows whose split is ``keep``; with ``keep``
    None, every row whose split is not ``exclude`` (rows with an empty or null split included); with both
    None, every row. The preprocessing job gives every row a split (the manifest's, else a held-out
    assignment by a hash of the video, :mod:`fdreamer.data.splits`), so "everything not held out" trains
    on WebVid and Pexels data as on generic manifests."""

    keep: str | None = None
    exclude: str | None = None

    def describe(self) -> str:
        if self.keep is not None:
            return f"split == {self.keep!r}"
        return f"split != {self.exclude!r}" if self.exclude is not None else "any split"


def as_rule(split: str | None | SplitRule) -> SplitRule:
    """A split argument as a :class:`SplitRule` (a string keeps that split; None keeps every row)."""
    return split if isinstance(split, SplitRule) else SplitRule(keep=split)


def train_rule(data: Any) -> SplitRule:
    """The training rows' rule of a ``DataConfig``: ``split`` when set, else every row not in ``heldout_split``."""
    return SplitRule(keep=data.split) if data.split is not None else SplitRule(exclude=data.heldout_split)


def split_counts(fs: pafs.FileSystem, files: list[str], limit: int = 64) -> dict[str, int]:
    """Rows per ``split`` value in the first ``limit`` shards (for error messages: what the data holds)."""
    counts: dict[str, int] = {}
    for path in files[:limit]:
        column = pq.read_table(path, columns=["split"], filesystem=fs).column("split")
        for value, n in zip(*(pc.value_counts(column).flatten())):
            key = "null" if value.as_py() is None else repr(value.as_py())
            counts[key] = counts.get(key, 0) + n.as_py()
    return dict(sorted(counts.items()))


def shard_files(path: str, s3_endpoint: str | None = None) -> tuple[pafs.FileSystem, list[str]]:
    """The filesystem and completed Parquet shards of a preprocessing output (a folder or ``s3://bucket/prefix``;
    sorted, temporaries ignored; S3 paths are ``bucket/key`` on the returned filesystem)."""
    from fdreamer.data import schema, storage

    try:
        fs, base = storage.resolve(path, s3_endpoint)
    except ValueError as exc:
        raise DataError(f"training data: {exc}") from exc
    if fs.get_file_info(base).type == pafs.FileType.NotFound and not storage.is_s3(path):
        raise DataError(f"training data {path!r} does not exist (run pipelines/preprocess.py first)")
    files = schema.shard_paths(path, s3_endpoint)
    if not files:
        raise DataError(f"{path}: no shards/part-*.parquet (is this a pipelines/preprocess.py output?)")
    return fs, files


def check_schema(fs: pafs.FileSystem, files: list[str], columns: tuple[str, ...] = TRAIN_COLUMNS) -> None:
    """Fail with a precise message when the shards were written by another schema version."""
    schema = pq.read_schema(files[0], filesystem=fs)
    meta = schema.metadata or {}
    version = meta.get(b"fdreamer.schema_version")
    if version is None or int(version) != SCHEMA_VERSION:
        raise DataError(
            f"{files[0]}: schema version {version.decode() if version else 'missing'}, this code reads "
            f"version {SCHEMA_VERSION}; re-run pipelines/preprocess.py with this checkout"
        )
    missing = [c for c in (*columns, *FILTER_COLUMNS) if c not in schema.names]
    if missing:
        raise DataError(f"{files[0]}: missing columns {missing}")


def row_mask(table: pa.Table, data: Any, split: str | None | SplitRule, kind: str = VIDEO) -> pa.Array:
    """Boolean mask of the rows a stage trains on: clips (``num_frames >= 2``; split, motion score range,
    frame count) or images (``num_frames == 1``; split only: images have no motion score). ``data``: the
    run's ``DataConfig`` (or anything with its ``min_motion_score`` / ``max_motion_score`` / ``num_frames``)."""
    mask = pa.array(np.ones(table.num_rows, dtype=bool))
    rule = as_rule(split)
    if rule.keep is not None and "split" in table.column_names:
        mask = pc.and_(mask, pc.fill_null(pc.equal(table["split"], rule.keep), False))
    elif rule.exclude is not None and "split" in table.column_names:
        mask = pc.and_(mask, pc.fill_null(pc.not_equal(table["split"], rule.exclude), True))
    if kind == IMAGE:
        return pc.and_(mask, pc.fill_null(pc.equal(table["num_frames"], 1), False))
    mask = pc.and_(mask, pc.fill_null(pc.greater_equal(table["num_frames"], 2), False))
    if data.min_motion_score is not None:
        mask = pc.and_(mask, pc.fill_null(pc.greater_equal(table["motion_score"], data.min_motion_score), False))
    if data.max_motion_score is not None:
        mask = pc.and_(mask, pc.fill_null(pc.less_equal(table["motion_score"], data.max_motion_score), False))
    if data.num_frames is not None:
        mask = pc.and_(mask, pc.equal(table["num_frames"], data.num_frames))
    return mask


def row_filter(data: Any, split: str | None | SplitRule, kind: str = VIDEO) -> pc.Expression:
    """The selection of :func:`row_mask` as a pyarrow dataset expression, so a scan reads only the row groups
    that can hold the rows (predicate pushdown: the held-out batch). Nulls select nothing, as in the mask;
    ``tests/test_training_rows.py`` checks that both select the same rows."""
    expr = pc.scalar(True)
    rule = as_rule(split)
    if rule.keep is not None:
        expr = pc.field("split") == rule.keep
    elif rule.exclude is not None:
        expr = pc.field("split").is_null() | (pc.field("split") != rule.exclude)
    if kind == IMAGE:
        return expr & (pc.field("num_frames") == 1)
    expr = expr & (pc.field("num_frames") >= 2)
    if data.min_motion_score is not None:
        expr = expr & (pc.field("motion_score") >= data.min_motion_score)
    if data.max_motion_score is not None:
        expr = expr & (pc.field("motion_score") <= data.max_motion_score)
    if data.num_frames is not None:
        expr = expr & (pc.field("num_frames") == data.num_frames)
    return expr


def filter_rows(batch: pa.Table, data: Any, split: str | None | SplitRule, kind: str = VIDEO) -> pa.Table:
    """The rows of ``batch`` that :func:`row_mask` selects, without the filter-only columns."""
    table = batch.filter(row_mask(batch, data, split, kind))
    return table.drop_columns([c for c in FILTER_COLUMNS if c in table.column_names])


def columns_for(predictnet: bool, kind: str = VIDEO) -> list[str]:
    """The columns a stage reads: the batch columns of ``kind``, flow when the PredictNet trains, the filters."""
    if kind == IMAGE:
        return list(IMAGE_COLUMNS) + list(FILTER_COLUMNS)
    return list(TRAIN_COLUMNS) + list(FILTER_COLUMNS) + (list(FLOW_COLUMNS) if predictnet else [])
