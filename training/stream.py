"""A worker's training stream: the batches of its :class:`~training.order.ReadPlan`, read ahead in a thread.

Each worker reads its own row groups straight from the shards (local or S3, one ``pyarrow`` filesystem
per worker) with column projection, in the plan's order. A background thread keeps ``prefetch`` batches
ready (collated, so the step only waits when the reader is slower than training: the ``data_wait_s``
metric). A position is ``(epoch, batches consumed)``; :meth:`RowStream.start` at any position yields
exactly the batches an uninterrupted stream yields from there, without building the earlier ones:
``built_batches`` (batches collated since the process started) exceeds the batches trained on by at most
the prefetch, and ``reread_rows`` counts the rows of the window read again to reach the position.

Why not Ray Data's ``streaming_split``: it hands blocks to workers as they ask, so which rows a worker
got depends on timing and a position cannot be restored without replaying the epoch from its start.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from training.order import Blocks, ReadPlan
from training.rows import FILTER_COLUMNS, DataError, SplitRule, filter_rows

_END = object()


class BlockReader:
    """The selected rows of a block (row group) with the stream's columns; recently opened shards cached."""

    def __init__(self, fs: pafs.FileSystem, blocks: Blocks, columns: list[str], data: Any,
                 split: str | None | SplitRule, kind: str, open_files: int = 8, cache_blocks: int = 0) -> None:
        self.fs, self.blocks, self.data, self.split, self.kind = fs, blocks, data, split, kind
        self.columns = [c for c in columns if c not in FILTER_COLUMNS]
        self.read_columns = self.columns + list(FILTER_COLUMNS)
        self._files: OrderedDict[int, pq.ParquetFile] = OrderedDict()
        self._open_files = open_files
        self.blocks_read = 0
        self._cache: OrderedDict[int, pa.Table] = OrderedDict()
        # at least the 2 last blocks: windows advance through the range, so a block larger than a window is
        # read once for the consecutive windows it spans (a 256 MB shard, 64-row windows: not ~6 reads)
        self._cache_blocks = max(cache_blocks, 2)

    def _file(self, index: int) -> pq.ParquetFile:
        if index in self._files:
            self._files.move_to_end(index)
        else:
            self._files[index] = pq.ParquetFile(self.blocks.files[index], filesystem=self.fs)
            while len(self._files) > self._open_files:
                self._files.popitem(last=False)
        return self._files[index]

    def read(self, block: int) -> pa.Table:
        """Block ``block``'s selected rows (in file order), the stream's columns only (from the cache of the
        ``cache_blocks`` last read when it is there)."""
        if block in self._cache:
            self._cache.move_to_end(block)
            return self._cache[block]
        where = f"{self.blocks.files[self.blocks.file_index[block]]} row group {self.blocks.row_group[block]}"
        try:
            table = self._file(self.blocks.file_index[block]).read_row_group(self.blocks.row_group[block],
                                                                             columns=self.read_columns)
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"{where}: {exc} (was the data moved or rewritten during the run?)") from exc
        table = filter_rows(table, self.data, self.split, self.kind).select(self.columns)
        if table.num_rows != self.blocks.selected[block]:
            raise DataError(f"{where}: {table.num_rows} selected rows, the plan counted {self.blocks.selected[block]} "
                            "(was the data moved or rewritten during the run?)")
        self._cache[block] = table
        while len(self._cache) > self._cache_blocks:
            self._cache.popitem(last=False)
        self.blocks_read += 1
        return table


def _columns(table: pa.Table) -> dict[str, np.ndarray]:
    return {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names}


class RowStream:
    """The batches of one worker's plan, epoch after epoch, from a position; ``collate`` turns a dict of
    numpy columns into the batch the loop trains on."""

    def __init__(self, plan: ReadPlan, reader: BlockReader, collate: Callable[[dict[str, np.ndarray]], Any], *,
                 prefetch: int = 2, epoch: int = 0, consumed: int = 0, name: str = "clips") -> None:
        self.plan, self.reader, self.collate, self.prefetch, self.name = plan, reader, collate, prefetch, name
        self.batch_size = plan.batch_size
        self.epoch, self.consumed = epoch, consumed
        self.built_batches = 0  # collated by the reader thread since this process started
        self.reread_rows = 0  # rows read again to restore a position inside a shuffle window
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ producer (reader thread)

    def _window(self, epoch: int, index: int) -> pa.Table:
        start, stop = self.plan.window_bounds(index)
        parts = [self.reader.read(s.block).slice(s.start, s.stop - s.start)
                 for s in self.plan.segments(epoch, start, stop)]
        table = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
        return table.take(pa.array(self.plan.window_order(epoch, index)))

    def _produce(self, epoch: int, consumed: int, out: queue.Queue, stop: threading.Event) -> None:
        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            plan, b = self.plan, self.batch_size
            row = consumed * b
            carry: pa.Table | None = None
            index = row // plan.window
            skip = row - index * plan.window
            self.reread_rows += skip
            while row < plan.rows_per_worker and not stop.is_set():
                table = self._window(epoch, index).slice(skip)
                skip, index = 0, index + 1
                if carry is not None:
                    table = pa.concat_tables([carry, table])
                whole = table.num_rows // b * b
                for offset in range(0, whole, b):
                    batch = self.collate(_columns(table.slice(offset, b)))
                    self.built_batches += 1
                    if not put(batch):
                        return
                    row += b
                carry = table.slice(whole) if whole < table.num_rows else None
            put(_END)
        except BaseException as exc:  # handed to the consumer, raised there
            put(exc)

    # ------------------------------------------------------------------ consumer (training loop)

    def close(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._thread.join()
        self._queue = self._stop = self._thread = None

    def start(self, epoch: int, consumed: int) -> None:
        """Continue from ``consumed`` batches into ``epoch`` (nothing before them is built)."""
        self.close()
        if not 0 <= consumed <= self.plan.batches_per_epoch:
            raise ValueError(f"{self.name} stream: position {consumed} outside the epoch's "
                             f"{self.plan.batches_per_epoch} batches")
        self.epoch, self.consumed = epoch, consumed
        self._queue, self._stop = queue.Queue(maxsize=max(1, self.prefetch)), threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(epoch, consumed, self._queue, self._stop),
                                        name=f"{self.name}-reader", daemon=True)
        self._thread.start()

    def next(self) -> Any | None:
        """The next batch of the current epoch, or None when the epoch is used up (position unchanged)."""
        if self._queue is None:
            self.start(self.epoch, self.consumed)
        item = self._queue.get()
        if item is _END:
            self._queue.put(_END)  # stays at the end until start()
            return None
        if isinstance(item, BaseException):
            raise item
        self.consumed += 1
        return item

    def next_cycling(self) -> Any:
        """The next batch, starting the next epoch when this one is used up (the secondary stream)."""
        batch = self.next()
        if batch is None:
            self.start(self.epoch + 1, 0)
            batch = self.next()
        return batch

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def stats(self) -> dict[str, int]:
        return {f"data/{self.name}_built_batches": self.built_batches,
                f"data/{self.name}_reread_rows": self.reread_rows}
