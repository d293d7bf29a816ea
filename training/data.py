"""The training data: the preprocessing job's Parquet shards read by each worker, columns selected, rows filtered.

Which rows and columns a stage reads is :mod:`training.rows` (torch-free); the order each worker reads
them in is :mod:`training.order` (a seeded block order per epoch, a contiguous range per worker,
shuffle windows) and the reading :mod:`training.stream`; this module puts them together
and builds the torch batches. A worker's position (epoch, micro-batches consumed) determines everything
after it, so a resume continues exactly without replaying a batch.

Two kinds of rows (VideoCrafter2 joint training): video clips (``num_frames >= 2``, from
``data.path``) and images (``num_frames == 1``, from ``data.image_path``). :func:`stream_kinds`: the
``train`` stream (the clips; the images when ``data.image_ratio = 1``) and ``images`` (joint batches,
``0 < image_ratio < 1``). The held-out rows are a filtered scan (predicate pushdown) on rank 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import torch

from fdreamer.data.batching import TrainBatch, to_train_batch
from fdreamer.device import pin
from fdreamer.data.schema import NULL_CONDITIONS_FILE, read_null_conditions, read_summary
from training.config import TrainConfig
from training.order import Blocks, ReadPlan, count_blocks
from training.rows import (IMAGE, IMAGE_COLUMNS, TRAIN_COLUMNS, VIDEO, DataError, check_schema, columns_for,
                           row_filter, shard_files, train_rule)
from training.stream import BlockReader, RowStream

IMAGE_STREAM_SEED_OFFSET = 5_003  # the image stream's shuffle seeds differ from the clip stream's

def _path(cfg: TrainConfig, kind: str) -> str:
    return cfg.data.image_path if kind == IMAGE else cfg.data.path


def _files(cfg: TrainConfig, kind: str) -> tuple[pafs.FileSystem, list[str]]:
    fs, files = shard_files(_path(cfg, kind), cfg.s3_endpoint)
    check_schema(fs, files, IMAGE_COLUMNS if kind == IMAGE else TRAIN_COLUMNS)
    return fs, files


def primary_kind(cfg: TrainConfig) -> str:
    """The kind of the ``train`` stream: the clips, or the images when ``data.image_ratio = 1``."""
    return VIDEO if cfg.video_micro_batch > 0 else IMAGE


def stream_kinds(cfg: TrainConfig) -> dict[str, str]:
    """The streams a run reads: ``train`` (:func:`primary_kind`) plus ``images`` for joint batches."""
    out = {"train": primary_kind(cfg)}
    if cfg.video_micro_batch > 0 and cfg.image_micro_batch > 0:
        out["images"] = IMAGE
    return out


def plan_blocks(cfg: TrainConfig) -> dict[str, Blocks]:
    """Driver side, once per run: the selected rows of every row group of each stream
    (:func:`training.order.count_blocks`, the filter columns only). The workers plan their reads from it.
    With joint batches it also checks that every worker gets at least one optimizer step of images."""
    out = {}
    for name, kind in stream_kinds(cfg).items():
        fs, files = _files(cfg, kind)
        out[name] = count_blocks(fs, files, cfg.data, train_rule(cfg.data), kind)
    if "images" in out:
        need = cfg.scaling.num_workers * cfg.image_micro_batch * cfg.accumulation
        if out["images"].total < need:
            raise DataError(f"{cfg.data.image_path}: {out['images'].total} image rows (num_frames = 1, "
                            f"{train_rule(cfg.data).describe()}); one optimizer step needs {need} (workers x images per "
                            "micro-batch x accumulation)")
    return out


def open_stream(cfg: TrainConfig, name: str, blocks: Blocks, *, rank: int, world: int,
                position: dict[str, int] | None = None, pin_memory: bool = False) -> RowStream:
    """Worker side: stream ``name`` (``train`` or ``images``) of this worker from ``position`` (epoch,
    batches consumed). The shuffle windows hold ``data.shuffle_buffer`` rows (at least a batch); the image
    stream's seeds differ from the clip stream's. ``pin_memory`` (CUDA workers): the reader thread puts
    each collated batch in page-locked memory, so the loop's copy to the GPU is non-blocking."""
    kind = stream_kinds(cfg)[name]
    batch = cfg.video_micro_batch if kind == VIDEO else cfg.image_micro_batch
    seed = cfg.seed * 10_007 + (IMAGE_STREAM_SEED_OFFSET if name == "images" else 0)
    plan = ReadPlan(blocks.selected, world, rank, batch, max(cfg.data.shuffle_buffer, batch), seed)
    if plan.batches_per_epoch == 0:
        raise DataError(f"{_path(cfg, kind)}: {blocks.total} {kind} rows, fewer than one micro-batch of {batch} "
                        f"per worker ({world} workers)")
    fs, _ = shard_files(_path(cfg, kind), cfg.s3_endpoint)
    reader = BlockReader(fs, blocks, columns_for(cfg.model.predictnet, kind), cfg.data, train_rule(cfg.data), kind,
                         cache_blocks=cfg.data.cache_blocks)
    with_flow = cfg.model.predictnet and kind == VIDEO

    def collate(columns: dict[str, np.ndarray]) -> TrainBatch:
        batch = to_train_batch(columns, with_flow=with_flow, image=kind == IMAGE, **conditions_for(cfg))
        return pin(batch) if pin_memory else batch

    position = position or {}
    return RowStream(plan, reader, collate, prefetch=cfg.data.prefetch_batches, name=name,
                     epoch=int(position.get("epoch", 0)), consumed=int(position.get("consumed", 0)))


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
