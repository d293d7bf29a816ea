"""The global plan's shuffle through storage (pipelines/shuffle.py), its map and reduce functions called
directly (no Ray): complete groups per partition, a retried map task adds no row, empty partitions."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from pipelines import shuffle

SCHEMA = pa.schema([("key", pa.string()), ("value", pa.int64())])


def _batch(keys: list[str], start: int) -> pa.Table:
    return pa.table({"key": keys, "value": list(range(start, start + len(keys)))}, schema=SCHEMA)


def _gather(root: Path, parts: int, fn=lambda t: t) -> list[pa.Table]:
    return [shuffle._gather(pa.table({"part": [k]}), str(root), None, "st", SCHEMA, fn, {}) for k in range(parts)]


def test_each_key_lands_in_one_partition_and_a_retried_map_task_adds_no_row(tmp_path: Path) -> None:
    keys = [f"clip-{i % 37}" for i in range(400)]
    a, b = _batch(keys[:250], 0), _batch(keys[250:], 250)
    counts = shuffle._scatter(a, str(tmp_path), None, [("st", "key")], 5, None).column("counts")[0].as_py()
    shuffle._scatter(a, str(tmp_path), None, [("st", "key")], 5, None)  # the same task run again (a retry)
    shuffle._scatter(b, str(tmp_path), None, [("st", "key")], 5, lambda t: {"tallied": t.num_rows})
    assert dict(counts)["rows"] == 250 and dict(counts)["files"] == len(set(shuffle.partition_of(a.column("key"), 5)))
    parts = _gather(tmp_path, 5)
    values = sorted(v for t in parts for v in t.column("value").to_pylist())
    assert values == list(range(400))  # every row exactly once, the retry replaced its files
    where = {k: i for i, t in enumerate(parts) for k in t.column("key").to_pylist()}
    for i, t in enumerate(parts):  # complete groups: a key's rows are all in one partition
        assert all(where[k] == i for k in t.column("key").to_pylist())
        assert Counter(t.column("key").to_pylist()) == Counter(k for k in keys if where[k] == i)


def test_the_stage_function_runs_once_per_partition_and_on_empty_ones(tmp_path: Path) -> None:
    shuffle._scatter(_batch(["a", "a", "b"], 0), str(tmp_path), None, [("st", "key")], 8, None)

    def per_partition(t: pa.Table) -> pa.Table:  # one summary row per call, also for an empty partition
        return pa.table({"rows": [t.num_rows], "keys": [len(pc.unique(t.column("key")))]})

    out = pa.concat_tables(_gather(tmp_path, 8, per_partition))
    assert out.num_rows == 8 and sum(out.column("rows").to_pylist()) == 3
    assert sorted(out.column("keys").to_pylist())[-2:] in ([1, 1], [0, 2])  # "a" and "b": apart or together
    assert out.column("rows").to_pylist().count(0) >= 6


def test_integer_keys_by_modulo_text_keys_by_crc32_stable() -> None:
    ints = pa.array([0, 7, 13, 2**40 + 3], pa.int64())
    assert shuffle.partition_of(ints, 5).tolist() == [0, 2, 3, (2**40 + 3) % 5]
    text = pa.array(["x", "y", "x"])
    first = shuffle.partition_of(text, 7)
    assert first[0] == first[2] and (shuffle.partition_of(text, 7) == first).all()
