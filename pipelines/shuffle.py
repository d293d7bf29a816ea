"""Hash shuffle through storage: the global plan's way to bring complete groups of a key into one task.

Ray Data's own shuffles (sort or hash) leave every intermediate block owned by the driver; at 1M
records the driver's memory grew ~2.6 KB per record over the plan's shuffles (``cluster/README.md``,
"Global plan, measured"), which is ~50 GB at 19M clips. Here the driver owns nothing per row:

- **scatter** (:meth:`StorageShuffle.write`): map tasks over bundles of about ``rows_per_task`` rows
  write each bundle's rows of partition ``k`` (``crc32(key) mod partitions``; integer keys modulo) to
  ``<root>/<stage>/p<k>/<name>.parquet`` and return one row of counts, which the driver sums while the
  stage streams (Ray Data frees each count row once consumed). ``<name>`` is the sha1 of the bundle's
  bytes, so a retried or lineage-rebuilt map task replaces its files instead of adding rows a second
  time. Two byte-identical bundles would share a name: they can only be the same rows read twice,
  which every stage keeps once anyway.
- **gather** (:meth:`StorageShuffle.read`): one task per partition lists and reads its folder and runs
  the stage function over the partition's rows (complete groups of the key); its output is a Ray
  Dataset that the next stage scatters again or the plan materializes (``partitions`` blocks).

Files per stage: (map bundles) x ``partitions``; at 19M clips and 100k rows per bundle and partition,
190 x 190 = 36k files of ~160 KB for a pass-1 shuffle. The root is ``<output>/_plan/<run token>``: a
shared location every node reaches (the output, local disk of a one-machine cluster or ``s3://``).
Each stage's folder is deleted once gathered; a new run deletes what a crashed run left (:func:`clear`).
"""

from __future__ import annotations

import hashlib
import uuid
import zlib
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from fdreamer.data import storage
from pipelines.plan_stages import _conform

SCRATCH_DIR = "_plan"
COUNTS_SCHEMA = pa.schema([("counts", pa.map_(pa.string(), pa.int64()))])


def partition_of(values: pa.ChunkedArray | pa.Array, partitions: int) -> np.ndarray:
    """Stable partition (0..partitions-1) of each key: integer keys modulo, others by crc32 of the text."""
    if pa.types.is_integer(values.type):
        return np.mod(values.to_numpy(zero_copy_only=False), partitions)
    return np.fromiter((zlib.crc32(str(v).encode()) % partitions for v in values.to_pylist()), np.int64,
                       count=len(values))


def counts_row(counts: dict[str, int]) -> pa.Table:
    """One row of named counts (what a task returns to the driver instead of rows)."""
    return pa.table({"counts": [{k: int(v) for k, v in counts.items()}]}, schema=COUNTS_SCHEMA)


def sum_counts(ds: ray.data.Dataset) -> Counter[str]:
    """Sum the count rows of ``ds`` as they stream (each block freed once read; nothing kept per block)."""
    total: Counter[str] = Counter()
    for t in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        if t.num_rows and "counts" in t.column_names:  # an empty block has no UDF call and no columns
            for m in t.column("counts").to_pylist():
                total.update(dict(m))
    return total


def _digest(table: pa.Table) -> str:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return hashlib.sha1(sink.getvalue().to_pybytes()).hexdigest()[:24]


def _part_dir(root: str, stage: str, part: int) -> str:
    return storage.join(root, stage, f"p{part:05d}")


def _scatter(batch: pa.Table, root: str, s3_endpoint: str | None, targets: list[tuple[str, str]],
             partitions: int, tally: Callable[[pa.Table], dict[str, int]] | None) -> pa.Table:
    """Write ``batch``'s rows of each partition, once per (stage, key) target; return its count row."""
    counts: Counter[str] = Counter({"rows": batch.num_rows})
    if tally is not None:
        counts.update(tally(batch))
    if batch.num_rows:
        fs, base = storage.resolve(root, s3_endpoint)
        name = f"{_digest(batch)}.parquet"
        for stage, key in targets:
            part = partition_of(batch.column(key), partitions)
            order = np.argsort(part, kind="stable")
            ordered = part[order]
            starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
            for s, e in zip(starts.tolist(), np.r_[starts[1:], len(order)].tolist(), strict=True):
                rows = batch.take(pa.array(order[s:e]))
                storage.write_parquet(fs, storage.join(_part_dir(base, stage, int(ordered[s])), name), rows)
                counts["files"] += 1
    return counts_row(counts)


def _gather(batch: pa.Table, root: str, s3_endpoint: str | None, stage: str, schema: pa.Schema,
            fn: Callable[..., pa.Table], kwargs: dict) -> pa.Table:
    """Partitions (one ``part`` per row) -> ``fn`` over each partition's rows (conformed to ``schema``)."""
    fs, base = storage.resolve(root, s3_endpoint)
    outs = []
    for part in batch.column("part").to_pylist():
        files = storage.list_files(fs, _part_dir(base, stage, part), suffix=".parquet")
        rows = [_conform(storage.read_parquet(fs, f), schema) for f in files]
        outs.append(fn(pa.concat_tables(rows) if rows else schema.empty_table(), **kwargs))
    return pa.concat_tables(outs)


@ray.remote(num_cpus=0.25)
def _delete(root: str, s3_endpoint: str | None) -> None:
    fs, base = storage.resolve(root, s3_endpoint)
    try:
        fs.delete_dir(base)
    except (FileNotFoundError, OSError):
        pass  # nothing there


def clear(output: str, s3_endpoint: str | None) -> None:
    """Delete every run's scratch under ``<output>/_plan`` (a crashed run's leftovers), by a worker."""
    ray.get(_delete.remote(storage.join(str(output), SCRATCH_DIR), s3_endpoint))


class StorageShuffle:
    """The scratch of one plan run: ``write`` scatters a dataset, ``read`` gathers a stage (module docstring)."""

    def __init__(self, output: str, s3_endpoint: str | None, partitions: int, rows_per_task: int) -> None:
        self.root = storage.join(str(output), SCRATCH_DIR, uuid.uuid4().hex[:12])
        self.s3_endpoint = s3_endpoint
        self.partitions = max(1, partitions)
        self.rows_per_task = max(1, rows_per_task)
        self.stage_partitions: dict[str, int] = {}  # a stage written with other than ``partitions``

    def write(self, ds: ray.data.Dataset, targets: list[tuple[str, str]],
              tally: Callable[[pa.Table], dict[str, int]] | None = None, bundle: bool = True,
              partitions: int | None = None) -> Counter[str]:
        """Scatter ``ds`` to each ``(stage, key)`` target; returns the summed counts (``rows``, ``files``, tally's).

        ``bundle``: map tasks over about ``rows_per_task`` rows (several blocks); else one task per block.
        ``partitions``: of these stages, when not the plan's (a stage with many rows per record).
        """
        parts = max(1, partitions or self.partitions)
        for stage, _ in targets:
            self.stage_partitions[stage] = parts
        kwargs = {"root": self.root, "s3_endpoint": self.s3_endpoint, "targets": targets,
                  "partitions": parts, "tally": tally}
        return sum_counts(ds.map_batches(_scatter, batch_format="pyarrow", fn_kwargs=kwargs,
                                         batch_size=self.rows_per_task if bundle else None))

    def read(self, stage: str, schema: pa.Schema, fn: Callable[..., pa.Table], **kwargs: Any) -> ray.data.Dataset:
        """``fn(rows of one partition, **kwargs)`` per partition of ``stage``, one task each (lazy)."""
        n = self.stage_partitions.get(stage, self.partitions)
        parts = ray.data.from_items([{"part": k} for k in range(n)], override_num_blocks=n)
        return parts.map_batches(_gather, batch_size=1, batch_format="pyarrow", fn_kwargs={
            "root": self.root, "s3_endpoint": self.s3_endpoint, "stage": stage, "schema": schema, "fn": fn,
            "kwargs": kwargs})

    def drop(self, stage: str | None = None) -> None:
        """Delete ``stage``'s files (all of this run's scratch when None), by a worker."""
        ray.get(_delete.remote(storage.join(self.root, stage) if stage else self.root, self.s3_endpoint))
