"""The training streams' read plan and reader (``training/order.py``, ``training/stream.py``), no Ray.

Real Parquet shards with the filter columns (several row groups per shard, rows the filters drop), a
collate that returns the clip ids: every epoch each worker gets the same number of whole batches, the
workers' rows are disjoint, epochs see different orders, and a stream started at any position gives
exactly the rest of the uninterrupted epoch without building the batches before it.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from training.order import ReadPlan, count_blocks
from training.rows import VIDEO, DataError
from training.stream import BlockReader, RowStream

DATA = SimpleNamespace(min_motion_score=0.1, max_motion_score=None, num_frames=None)
SIZES = [(13, 5), (7, 7), (22, 4), (3, 3), (9, 2)]  # (rows, row group size) per shard


def _ids(columns: dict[str, np.ndarray]) -> list[str]:
    return [str(c) for c in columns["clip_id"]]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """5 shards, 54 rows; every 4th row is static (motion 0.0, filtered out), every 9th is held out."""
    root = tmp_path_factory.mktemp("order")
    files, keep, n = [], [], 0
    for i, (rows, group) in enumerate(SIZES):
        ids = [f"c{n + j:03d}" for j in range(rows)]
        motion = [0.0 if (n + j) % 4 == 3 else 0.5 for j in range(rows)]
        split = ["heldout" if (n + j) % 9 == 8 else "train" for j in range(rows)]
        table = pa.table({"clip_id": ids, "split": split, "motion_score": motion, "num_frames": [8] * rows,
                          "schema_version": [1] * rows})
        path = root / f"part-{i}.parquet"
        pq.write_table(table, path, row_group_size=group)
        files.append(str(path))
        keep += [c for c, m, s in zip(ids, motion, split) if m >= 0.1 and s == "train"]
        n += rows
    return {"files": files, "keep": keep, "fs": pafs.LocalFileSystem()}


def _blocks(shards: dict):
    return count_blocks(shards["fs"], shards["files"], DATA, "train", VIDEO, threads=3)


def _stream(shards: dict, rank: int, world: int = 2, batch: int = 3, window: int = 7, **kw) -> RowStream:
    blocks = _blocks(shards)
    reader = BlockReader(shards["fs"], blocks, ["clip_id"], DATA, "train", VIDEO)
    return RowStream(ReadPlan(blocks.selected, world, rank, batch, window, seed=11), reader, _ids, **kw)


def _epoch(stream: RowStream) -> list[list[str]]:
    out = []
    while (batch := stream.next()) is not None:
        out.append(batch)
    return out


def test_blocks_count_the_selected_rows_of_every_row_group(shards: dict) -> None:
    blocks = _blocks(shards)
    assert blocks.total == len(shards["keep"]) == 36
    # 16 row groups; the last one of part-4 holds only c053, held out: a block that selects nothing is left out
    assert sum(-(-rows // group) for rows, group in SIZES) == 16 and len(blocks.selected) == 15
    assert blocks.row_group[-4:] == (0, 1, 2, 3) and blocks.file_index[-1] == 4
    assert blocks.row_group[:3] == (0, 1, 2) and blocks.file_index[:4] == (0, 0, 0, 1)


def test_workers_get_equal_disjoint_whole_batches_and_epochs_reshuffle(shards: dict) -> None:
    orders = []
    for epoch in (0, 1):
        per_rank = []
        for rank in (0, 1):
            stream = _stream(shards, rank)
            stream.start(epoch, 0)
            per_rank.append(_epoch(stream))
            stream.close()
        assert [len(b) for b in per_rank] == [6, 6] and all(len(x) == 3 for b in per_rank for x in b)  # 36 // 2 // 3
        rows = [c for b in per_rank for x in b for c in x]
        assert len(set(rows)) == 36 and set(rows) == set(shards["keep"])  # nothing filtered in, nothing twice
        orders.append(rows)
    assert orders[0] != orders[1] and sorted(orders[0]) == sorted(orders[1])


def test_a_stream_started_at_any_position_continues_exactly_without_replaying(shards: dict) -> None:
    straight = _stream(shards, 1, prefetch=1)
    straight.start(2, 0)
    want = _epoch(straight)
    for consumed in range(len(want) + 1):
        resumed = _stream(shards, 1, prefetch=1)
        resumed.start(2, consumed)
        assert _epoch(resumed) == want[consumed:]
        # nothing before the position is built; the rows before it in its window are read again, no more
        assert resumed.built_batches == len(want) - consumed
        assert resumed.reread_rows == consumed * 3 % 7 and resumed.position() == {"epoch": 2, "consumed": len(want)}


def test_the_cycling_stream_crosses_epochs_and_resumes_exactly(shards: dict) -> None:
    straight = _stream(shards, 0)
    seen = [straight.next_cycling() for _ in range(14)]  # 6 batches an epoch: crosses two epoch ends
    assert straight.position() == {"epoch": 2, "consumed": 2}
    assert seen[:6] != seen[6:12]
    again = _stream(shards, 0)
    first = [again.next_cycling() for _ in range(8)]
    resumed = _stream(shards, 0, **again.position())
    assert first + [resumed.next_cycling() for _ in range(6)] == seen


def test_a_block_spanning_several_windows_is_read_once(shards: dict) -> None:
    """One shard of 40 rows in one row group, windows of 4 rows: the block is read once per epoch, not 10 times."""
    fs, path = shards["fs"], str(Path(shards["files"][0]).parent / "big.parquet")
    pq.write_table(pa.table({"clip_id": [f"b{i}" for i in range(40)], "split": ["train"] * 40,
                             "motion_score": [0.5] * 40, "num_frames": [8] * 40, "schema_version": [1] * 40}), path)
    blocks = count_blocks(fs, [path], DATA, "train", VIDEO)
    stream = RowStream(ReadPlan(blocks.selected, 1, 0, 2, 4, seed=3),
                       BlockReader(fs, blocks, ["clip_id"], DATA, "train", VIDEO), _ids)
    assert len(_epoch(stream)) == 20 and stream.reader.blocks_read == 1


def test_cached_blocks_give_the_same_stream(shards: dict) -> None:
    plain = _stream(shards, 0)
    blocks = _blocks(shards)
    cached = RowStream(ReadPlan(blocks.selected, 2, 0, 3, 7, seed=11),
                       BlockReader(shards["fs"], blocks, ["clip_id"], DATA, "train", VIDEO, cache_blocks=100), _ids)
    for epoch in (0, 1):
        plain.start(epoch, 0), cached.start(epoch, 0)
        assert _epoch(plain) == _epoch(cached)
    plan = cached.plan  # the cache holds exactly the blocks this worker read in the two epochs
    read = {seg.block for e in (0, 1) for seg in plan.segments(e, 0, plan.rows_per_worker)}
    assert set(cached.reader._cache) == read and len(read) < len(blocks.selected)


def test_reader_errors_reach_the_training_loop(shards: dict, tmp_path: Path) -> None:
    """A shard rewritten under the run (other selected counts) or gone: the error surfaces in ``next()``."""
    files = []
    for i, f in enumerate(shards["files"]):
        files.append(str(tmp_path / f"p{i}.parquet"))
        Path(files[-1]).write_bytes(Path(f).read_bytes())
    moved = {**shards, "files": files}
    stream = _stream(moved, 0, window=40)
    table = pq.read_table(files[0])
    pq.write_table(table.slice(0, 4), files[0], row_group_size=5)  # the plan counted 4 + 3 + 2 rows there
    Path(files[2]).unlink()
    with pytest.raises(DataError, match=r"p0.parquet row group 0: 3 selected rows, the plan counted 4|"
                                        r"p0.parquet row group [12]: .*index|p2.parquet row group \d: .*"):
        _epoch(stream)


def test_plan_validates_its_inputs() -> None:
    with pytest.raises(ValueError, match="rank 2 of 2"):
        ReadPlan((5,), 2, 2, 1, 1, 0)
    with pytest.raises(ValueError, match="window 2 rows must hold a batch of 3"):
        ReadPlan((5,), 1, 0, 3, 2, 0)
    plan = ReadPlan((5, 9), 2, 1, 2, 4, 0)
    assert plan.rows_per_worker == 6 and plan.batches_per_epoch == 3
    with pytest.raises(ValueError, match="outside this worker's 6 rows"):
        plan.segments(0, 0, 7)
    segs = plan.segments(0, 0, 6)
    assert sum(s.stop - s.start for s in segs) == 6
