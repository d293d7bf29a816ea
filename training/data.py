"""The training data on Ray Data: read the preprocessing job's Parquet shards, select columns, filter.

Which rows and columns a stage reads is :mod:`training.rows` (torch-free, so the Ray Data read tasks that
filter rows do not import torch); this module builds the datasets and the torch batches. Order is deterministic (Ray Data
``preserve_order``), so a worker's data position (epoch, micro-batches consumed) reproduces exactly.

Two kinds of rows (VideoCrafter2 joint training): video clips (``num_frames >= 2``, from
``data.path``) and images (``num_frames == 1``, from ``data.image_path``). :func:`train_datasets`
gives Ray Train one dataset per stream in use: ``train`` (the clips; the images when
``data.image_ratio = 1``) and ``images`` (joint batches, ``0 < image_ratio < 1``). Each worker reads
its shards with a :class:`ShardStream` that knows its position, so a resume continues both streams
exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import torch

from fdreamer.data.batching import TrainBatch, to_train_batch
from fdreamer.data.schema import NULL_CONDITIONS_FILE, read_null_conditions, read_summary
from training.config import TrainConfig
from training.rows import (IMAGE, IMAGE_COLUMNS, TRAIN_COLUMNS, VIDEO, DataError, check_schema, columns_for,
                           count, filter_rows, row_filter, shard_files)

def _path(cfg: TrainConfig, kind: str) -> str:
    return cfg.data.image_path if kind == IMAGE else cfg.data.path


def _files(cfg: TrainConfig, kind: str) -> tuple[pafs.FileSystem, list[str]]:
    fs, files = shard_files(_path(cfg, kind), cfg.s3_endpoint)
    check_schema(fs, files, IMAGE_COLUMNS if kind == IMAGE else TRAIN_COLUMNS)
    return fs, files


def dataset(cfg: TrainConfig, kind: str = VIDEO):  # -> ray.data.Dataset
    """The ``kind`` rows of the stage as a Ray Dataset (column selection + filters; nothing loaded yet)."""
    import ray.data

    # Ray 2.60's DataSource V2 Parquet read (ListFiles -> ReadFiles, the new default) took 13-31 s to
    # materialize 32 small shards on a local 2-CPU cluster where the V1 reader takes 0.7-4 s (same driver,
    # same files); a tiny training job paid it before its first step. V1 reads the same rows in the same order.
    ray.data.DataContext.get_current().use_datasource_v2 = False
    fs, files = _files(cfg, kind)
    ds = ray.data.read_parquet(files, filesystem=fs, columns=columns_for(cfg.model.predictnet, kind), shuffle=None)
    ds = ds.map_batches(filter_rows, batch_format="pyarrow",
                        fn_kwargs={"cfg": _plain(cfg.data), "split": cfg.data.split, "kind": kind})
    return ds.materialize() if cfg.data.materialize else ds


def train_dataset(cfg: TrainConfig):  # -> ray.data.Dataset
    """The primary stream (``train``): the video clips, or the images when ``data.image_ratio = 1``."""
    return dataset(cfg, VIDEO if cfg.video_micro_batch > 0 else IMAGE)


def train_datasets(cfg: TrainConfig) -> dict[str, Any]:
    """Ray Train's ``datasets``: ``train`` (:func:`train_dataset`) plus ``images`` for joint batches."""
    out = {"train": train_dataset(cfg)}
    if cfg.video_micro_batch > 0 and cfg.image_micro_batch > 0:
        out["images"] = dataset(cfg, IMAGE)
    return out


def _count(cfg: TrainConfig, kind: str) -> int:
    return count(*_files(cfg, kind), cfg.data, cfg.data.split, kind)


def count_rows(cfg: TrainConfig) -> int:
    """Rows of the primary stream (reads only the filter columns; plain pyarrow). With joint batches it
    also checks that every worker gets at least one optimizer step of images (DataError otherwise)."""
    primary = VIDEO if cfg.video_micro_batch > 0 else IMAGE
    if primary == VIDEO and cfg.image_micro_batch > 0:
        images = _count(cfg, IMAGE)
        need = cfg.scaling.num_workers * cfg.image_micro_batch * cfg.accumulation
        if images < need:
            raise DataError(f"{cfg.data.image_path}: {images} image rows (num_frames = 1, split {cfg.data.split!r}); "
                            f"one optimizer step needs {need} (workers x images per micro-batch x accumulation)")
    return _count(cfg, primary)


def heldout_table(cfg: TrainConfig, columns: list[str], kind: str = VIDEO, limit: int | None = None) -> pa.Table:
    """The ``heldout_split`` rows of the clips or images, sorted by clip id (at most ``limit``): a filtered
    scan (:func:`training.rows.row_filter`: predicate pushdown), not a read of every shard."""
    fs, files = shard_files(_path(cfg, kind), cfg.s3_endpoint)
    dataset = pads.dataset(files, filesystem=fs, format="parquet")
    table = dataset.to_table(columns=columns, filter=row_filter(cfg.data, cfg.data.heldout_split, kind))
    table = table.sort_by("clip_id")
    return table if limit is None else table.slice(0, limit)


def heldout_batch(cfg: TrainConfig, kind: str = VIDEO) -> TrainBatch | None:
    """The validation rows (``heldout_split``, at most ``max_heldout``) of the clips or the images."""
    if cfg.data.heldout_split is None or (kind == IMAGE and not cfg.data.image_path):
        return None
    table = heldout_table(cfg, columns_for(cfg.model.predictnet, kind), kind, cfg.data.max_heldout)
    if table.num_rows == 0:
        return None
    return to_train_batch(table.to_pydict(), with_flow=cfg.model.predictnet and kind == VIDEO, image=kind == IMAGE,
                          **conditions_for(cfg))


def load_null(path: str, s3_endpoint: str | None = None) -> dict[str, torch.Tensor]:
    """The classifier-free-guidance null conditions written by the preprocessing job (local or S3)."""
    try:
        return read_null_conditions(path, s3_endpoint)
    except FileNotFoundError as exc:
        raise DataError(f"{path}: no {NULL_CONDITIONS_FILE} (needed for classifier-free-guidance dropout)") from exc


def data_summary(path: str, s3_endpoint: str | None = None) -> dict[str, Any]:
    """The preprocessing job's ``summary.json`` ({} when absent)."""
    try:
        return read_summary(path, s3_endpoint, require_success=False)
    except FileNotFoundError:
        return {}


def conditions_for(cfg: TrainConfig) -> dict[str, bool]:
    """Which conditions the model takes (``to_train_batch`` options): no T5 tokens when the temporal
    layers read CLIP text (Table 4 (c)), no first-frame conditions for the direct T2V model (row (b))."""
    return {"with_t5": cfg.model.temporal_text_encoder == "t5", "with_image": cfg.model.factorized}


def make_collate(with_flow: bool, image: bool = False, *, with_t5: bool = True, with_image: bool = True):
    """The ``iter_torch_batches(collate_fn=...)`` object: Ray's numpy columns -> :class:`TrainBatch`."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class TrainBatchCollate(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> TrainBatch:
            return to_train_batch(batch, with_flow=with_flow and not image, image=image, with_t5=with_t5,
                                  with_image=with_image)

    return TrainBatchCollate()


class ShardStream:
    """One worker's shard of a dataset, read epoch after epoch from a position (epoch, batches consumed).

    The shuffle buffer is reseeded every epoch (``seed * 10_007 + epoch + seed_offset``) and the
    order is deterministic, so re-creating the stream at a saved position continues it exactly.
    """

    def __init__(self, shard: Any, batch_size: int, cfg: TrainConfig, collate: Any, *, epoch: int = 0,
                 consumed: int = 0, seed_offset: int = 0) -> None:
        self.shard, self.batch_size, self.cfg, self.collate = shard, batch_size, cfg, collate
        self.epoch, self.consumed, self.seed_offset = epoch, consumed, seed_offset
        self._it: Any = None

    def start(self, epoch: int, consumed: int) -> None:
        """(Re)start the iterator of ``epoch`` and skip its first ``consumed`` batches."""
        self.epoch, self.consumed = epoch, consumed
        self._it = iter(self.shard.iter_torch_batches(
            batch_size=self.batch_size, drop_last=True, prefetch_batches=self.cfg.data.prefetch_batches,
            local_shuffle_buffer_size=self.cfg.data.shuffle_buffer or None,
            local_shuffle_seed=self.cfg.seed * 10_007 + epoch + self.seed_offset, collate_fn=self.collate))
        for _ in range(consumed):  # resume inside an epoch: skip what was used
            next(self._it)

    def next(self) -> TrainBatch | None:
        """The next batch of the current epoch, or None when the epoch is used up (position unchanged)."""
        if self._it is None:
            self.start(self.epoch, self.consumed)
        mb = next(self._it, None)
        if mb is not None:
            self.consumed += 1
        return mb

    def next_cycling(self) -> TrainBatch:
        """The next batch, starting the next epoch when this one is used up (the secondary stream)."""
        mb = self.next()
        if mb is None:
            if self.consumed == 0:
                raise DataError(f"the image shard gave no batch of {self.batch_size} in epoch {self.epoch}")
            self.start(self.epoch + 1, 0)
            mb = self.next()
            if mb is None:
                raise DataError(f"the image shard gave no batch of {self.batch_size} in epoch {self.epoch}")
        return mb

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}


def _plain(dc: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(dc)
