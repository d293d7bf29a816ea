"""The training data on Ray Data: read the preprocessing job's Parquet shards, select columns, filter.

Scores are columns of the data (``motion_score``, ``split``, ``num_frames``): a stage selects rows with
:func:`filter_rows` at read time instead of deleting anything. Order is deterministic (Ray Data
``preserve_order``), so a worker's data position (epoch, micro-batches consumed) reproduces exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from fdreamer.batching import FLOW_COLUMNS, TRAIN_COLUMNS, TrainBatch, to_train_batch
from fdreamer.data.schema import SCHEMA_VERSION
from training.config import DataConfig, TrainConfig

FILTER_COLUMNS = ("split", "motion_score", "num_frames", "schema_version")


class DataError(ValueError):
    """The training data is missing or does not fit this code / this run's configuration."""


def shard_files(path: str) -> list[str]:
    """The completed Parquet shards of a preprocessing output (sorted; temp files ignored)."""
    root = Path(path)
    if not root.exists():
        raise DataError(f"training data {path!r} does not exist (run pipelines/preprocess.py first)")
    files = sorted(str(p) for p in (root / "shards").glob("part-*.parquet"))
    if not files:
        raise DataError(f"{path}: no shards/part-*.parquet (is this a pipelines/preprocess.py output?)")
    return files


def check_schema(files: list[str]) -> None:
    """Fail with a precise message when the shards were written by another schema version."""
    schema = pq.read_schema(files[0])
    meta = schema.metadata or {}
    version = meta.get(b"fdreamer.schema_version")
    if version is None or int(version) != SCHEMA_VERSION:
        raise DataError(
            f"{files[0]}: schema version {version.decode() if version else 'missing'}, this code reads "
            f"version {SCHEMA_VERSION}; re-run pipelines/preprocess.py with this checkout"
        )
    missing = [c for c in (*TRAIN_COLUMNS, *FILTER_COLUMNS) if c not in schema.names]
    if missing:
        raise DataError(f"{files[0]}: missing columns {missing}")


def row_mask(table: pa.Table, cfg: DataConfig, split: str | None) -> pa.Array:
    """Boolean mask of the rows a stage trains on (split, motion score range, frame count)."""
    mask = pa.array(np.ones(table.num_rows, dtype=bool))
    if split is not None and "split" in table.column_names:
        mask = pc.and_(mask, pc.fill_null(pc.equal(table["split"], split), False))
    if cfg.min_motion_score is not None:
        mask = pc.and_(mask, pc.fill_null(pc.greater_equal(table["motion_score"], cfg.min_motion_score), False))
    if cfg.max_motion_score is not None:
        mask = pc.and_(mask, pc.fill_null(pc.less_equal(table["motion_score"], cfg.max_motion_score), False))
    if cfg.num_frames is not None:
        mask = pc.and_(mask, pc.equal(table["num_frames"], cfg.num_frames))
    return mask


def filter_rows(batch: pa.Table, cfg: dict[str, Any], split: str | None) -> pa.Table:
    """Ray Data ``map_batches`` form of :func:`row_mask` (then drops the filter-only columns)."""
    table = batch.filter(row_mask(batch, DataConfig(**cfg), split))
    return table.drop_columns([c for c in FILTER_COLUMNS if c in table.column_names])


def columns_for(cfg: TrainConfig) -> list[str]:
    cols = list(TRAIN_COLUMNS) + list(FILTER_COLUMNS)
    if cfg.model.predictnet:
        cols += list(FLOW_COLUMNS)
    return cols


def train_dataset(cfg: TrainConfig):  # -> ray.data.Dataset
    """The stage's training rows as a Ray Dataset (column selection + filters; nothing loaded yet)."""
    import ray.data

    files = shard_files(cfg.data.path)
    check_schema(files)
    ds = ray.data.read_parquet(files, columns=columns_for(cfg), shuffle=None)
    ds = ds.map_batches(filter_rows, batch_format="pyarrow",
                        fn_kwargs={"cfg": _plain(cfg.data), "split": cfg.data.split})
    return ds.materialize() if cfg.data.materialize else ds


def count_rows(cfg: TrainConfig) -> int:
    """Rows the stage trains on (reads only the filter columns; plain pyarrow)."""
    files = shard_files(cfg.data.path)
    check_schema(files)
    table = pq.read_table(files, columns=list(FILTER_COLUMNS))
    return int(pc.sum(row_mask(table, cfg.data, cfg.data.split).cast(pa.int64())).as_py() or 0)


def heldout_batch(cfg: TrainConfig) -> TrainBatch | None:
    """The validation clips (``heldout_split`` rows, at most ``max_heldout``), decoded in memory."""
    if cfg.data.heldout_split is None:
        return None
    files = shard_files(cfg.data.path)
    table = pq.read_table(files, columns=columns_for(cfg))
    table = table.filter(row_mask(table, cfg.data, cfg.data.heldout_split))
    if table.num_rows == 0:
        return None
    table = table.sort_by("clip_id").slice(0, cfg.data.max_heldout)
    return to_train_batch(table.to_pydict(), with_flow=cfg.model.predictnet)


def null_conditions_file(path: str) -> Path:
    f = Path(path) / "null_conditions.safetensors"
    if not f.is_file():
        raise DataError(f"{path}: no null_conditions.safetensors (needed for classifier-free-guidance dropout)")
    return f


def load_null(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(null_conditions_file(path)))


def data_summary(path: str) -> dict[str, Any]:
    f = Path(path) / "summary.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def make_collate(with_flow: bool):
    """The ``iter_torch_batches(collate_fn=...)`` object: Ray's numpy columns -> :class:`TrainBatch`."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class TrainBatchCollate(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> TrainBatch:
            return to_train_batch(batch, with_flow=with_flow)

    return TrainBatchCollate()


def _plain(dc: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(dc)
