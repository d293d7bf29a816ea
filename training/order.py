"""The read plan of a training stream: which rows each worker reads in an epoch, in which order (no torch).

The unit of the plan is a Parquet **row group** of a shard (a block). The driver counts, once, the rows of
every block that the stage's filters select (:func:`count_blocks`: the filter columns only, in parallel)
and hands the counts to every worker. From them each worker derives, with no communication:

1. **block order**: a permutation of the blocks seeded by ``(seed, epoch)`` (a new order every epoch);
2. **its range**: the selected rows of the blocks in that order form one sequence; worker ``r`` of ``W``
   takes rows ``[r * n, (r + 1) * n)`` with ``n = floor(total / W / batch) * batch`` (every worker the same
   number of whole batches; the remainder is left out of that epoch, a different remainder each epoch);
3. **windows**: its range is cut into windows of ``window`` rows, each permuted by ``(seed, epoch, rank,
   window index)`` (the local shuffle buffer, but stateless).

So the rows a worker reads from position ``p`` (rows consumed in the epoch) are a pure function of
``(seed, epoch, rank, p)``. A resume reads the window holding ``p`` again and drops its first
``p - window_start`` rows in memory; no batch is built, collated or trained on twice. Granularity: exact
to the batch (a position is a count of batches), at a read cost of at most one window.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from training.rows import FILTER_COLUMNS, SplitRule, row_mask


@dataclass(frozen=True)
class Blocks:
    """The row groups of a stream's shards and how many of their rows the stage selects."""

    files: tuple[str, ...]
    """Shard paths on the data's filesystem (``bucket/key`` on S3)."""
    file_index: tuple[int, ...]
    """Per block: its shard (an index into ``files``)."""
    row_group: tuple[int, ...]
    """Per block: its row group in the shard."""
    selected: tuple[int, ...]
    """Per block: rows the stage's filters select."""

    @property
    def total(self) -> int:
        return int(sum(self.selected))

    def to_dict(self) -> dict[str, Any]:
        return {"files": list(self.files), "file_index": list(self.file_index), "row_group": list(self.row_group),
                "selected": list(self.selected)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Blocks:
        return cls(tuple(d["files"]), tuple(d["file_index"]), tuple(d["row_group"]), tuple(d["selected"]))


def _count_file(fs: pafs.FileSystem, path: str, data: Any, split: str | None | SplitRule, kind: str) -> list[int]:
    parquet = pq.ParquetFile(path, filesystem=fs)
    sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.metadata.num_row_groups)]
    mask = np.asarray(row_mask(parquet.read(columns=list(FILTER_COLUMNS)), data, split, kind), dtype=bool)
    bounds = np.cumsum([0, *sizes])
    return [int(mask[bounds[g]:bounds[g + 1]].sum()) for g in range(len(sizes))]


def count_blocks(fs: pafs.FileSystem, files: list[str], data: Any, split: str | None | SplitRule, kind: str,
                 threads: int = 16) -> Blocks:
    """Selected rows per row group of ``files`` (reads the filter columns only; ``threads`` files at once:
    S3 latency, not CPU, is what this waits on). Blocks that select nothing are left out."""
    with ThreadPoolExecutor(max(1, min(threads, len(files)))) as pool:
        per_file = list(pool.map(lambda f: _count_file(fs, f, data, split, kind), files))
    index, groups, selected = [], [], []
    for i, counts in enumerate(per_file):
        for g, n in enumerate(counts):
            if n:
                index.append(i), groups.append(g), selected.append(n)
    return Blocks(tuple(files), tuple(index), tuple(groups), tuple(selected))


@dataclass(frozen=True)
class Segment:
    """Rows ``[start, stop)`` of the selected rows of block ``block``."""

    block: int
    start: int
    stop: int


@dataclass(frozen=True)
class ReadPlan:
    """One stream's plan for one worker: :func:`segments` and :func:`window_order` of any epoch."""

    selected: tuple[int, ...]
    """Selected rows per block (:attr:`Blocks.selected`)."""
    world: int
    rank: int
    batch_size: int
    window: int
    """Rows per shuffle window (at least one batch)."""
    seed: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} of {self.world} workers")
        if self.batch_size < 1 or self.window < self.batch_size:
            raise ValueError(f"window {self.window} rows must hold a batch of {self.batch_size}")

    @property
    def rows_per_worker(self) -> int:
        """Rows each worker reads per epoch: whole batches, the same for every worker."""
        return sum(self.selected) // self.world // self.batch_size * self.batch_size

    @property
    def batches_per_epoch(self) -> int:
        return self.rows_per_worker // self.batch_size

    def block_order(self, epoch: int) -> np.ndarray:
        """The blocks in the order of ``epoch`` (a seeded permutation, new every epoch)."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.selected))

    def segments(self, epoch: int, start: int, stop: int) -> list[Segment]:
        """The block slices holding rows ``[start, stop)`` of this worker's range in ``epoch``."""
        if not 0 <= start <= stop <= self.rows_per_worker:
            raise ValueError(f"rows [{start}, {stop}) outside this worker's {self.rows_per_worker} rows per epoch")
        order = self.block_order(epoch)
        sizes = np.asarray(self.selected, dtype=np.int64)[order]
        ends = np.cumsum(sizes)  # end of each block in the epoch's row sequence
        lo, hi = self.rank * self.rows_per_worker + start, self.rank * self.rows_per_worker + stop
        out = []
        for i in range(int(np.searchsorted(ends, lo, side="right")), len(order)):
            begin = int(ends[i] - sizes[i])
            if begin >= hi:
                break
            out.append(Segment(int(order[i]), max(lo, begin) - begin, min(hi, int(ends[i])) - begin))
        return out

    def window_bounds(self, index: int) -> tuple[int, int]:
        """Rows ``[start, stop)`` of window ``index`` in this worker's range (the last one may be short)."""
        return index * self.window, min((index + 1) * self.window, self.rows_per_worker)

    def window_order(self, epoch: int, index: int) -> np.ndarray:
        """The order of the rows of window ``index`` in ``epoch`` (seeded by seed, epoch, rank, window)."""
        start, stop = self.window_bounds(index)
        return np.random.default_rng([self.seed, epoch, self.rank, index]).permutation(stop - start)
