"""The shard commit ledger: what every complete shard holds, without opening the shards.

A shard is committed when its file exists (written atomically: temp name + rename locally, one upload on
S3). Each run then records its shards in one ledger file ``<output>/_ledger/run-<time>-<id>.parquet`` (one
row per shard: name, rows, ``t5_caption``, compressed bytes per column, taken from the writer's own footer
and returned with the write task's rows; the driver writes the file, O(shards) small rows, not O(clips)). A run that crashed wrote shards but no ledger file: the next run lists ``shards/``
(a listing, ~1 request per 1,000 shards), reads the footers of the shards no ledger names (only those:
the crashed run's), and records them in ``_ledger/recovered-<time>-<id>.parquet``. So a run reads O(runs)
ledger files and O(unrecorded shards) footers, never every footer (at 19M clips, ~44k shards: 44k serial
footer reads were ~1 h of driver time at each start and end).

The ledger is also what ``summary.json`` reports (``rows_in_shards``, ``bytes_per_clip``) and what the
``t5_caption`` check reads. A shard rewritten under the same name (a retried write task: names follow from
the clip ids, :func:`pipelines.stages.part_name`) is one row: the last record of a name wins.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fdreamer.data import schema, storage

LEDGER_DIR = "_ledger"
LEDGER_SCHEMA = pa.schema([("shard", pa.string()), ("rows", pa.int64()), ("t5_caption", pa.string()),
                           ("column_bytes", pa.string())])  # column_bytes: JSON {column: compressed bytes}


def entry(shard: str, meta: pq.FileMetaData) -> dict:
    """The ledger row of shard file ``shard`` (its name) from its footer."""
    sizes: Counter[str] = Counter()
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        for c in range(rg.num_columns):
            col = rg.column(c)
            sizes[col.path_in_schema.split(".")[0]] += col.total_compressed_size
    return {"shard": shard, "rows": meta.num_rows,
            "t5_caption": schema.shard_t5_caption(meta.schema.to_arrow_schema().metadata),
            "column_bytes": json.dumps(dict(sorted(sizes.items())))}


def _file_name(kind: str) -> str:
    return f"{kind}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.parquet"


def write(fs: pafs.FileSystem, base: str, rows: list[dict], kind: str = "run") -> str | None:
    """Record ``rows`` (ledger rows) in a new ledger file; None when there is nothing to record."""
    if not rows:
        return None
    path = storage.join(base, LEDGER_DIR, _file_name(kind))
    storage.write_parquet(fs, path, pa.Table.from_pylist(rows, schema=LEDGER_SCHEMA))
    return path


def read(fs: pafs.FileSystem, base: str) -> dict[str, dict]:
    """Every recorded shard (name -> ledger row; the last record of a name wins)."""
    out: dict[str, dict] = {}
    for path in storage.list_files(fs, storage.join(base, LEDGER_DIR), "", ".parquet"):
        for row in storage.read_parquet(fs, path).to_pylist():
            out[row["shard"]] = row
    return out


def reconcile(fs: pafs.FileSystem, base: str, threads: int = 16) -> tuple[dict[str, dict], int]:
    """(the ledger of the complete shards now in ``shards/``, shards recovered): shards no ledger file
    names get their footers read (``threads`` at a time) and recorded; ledger rows of shards that are
    gone are left out."""
    recorded = read(fs, base)
    listed = {p.rpartition("/")[2]: p for p in storage.list_files(fs, storage.join(base, "shards"), "part-", ".parquet")}
    missing = sorted(set(listed) - set(recorded))
    if missing:
        with ThreadPoolExecutor(max(1, min(threads, len(missing)))) as pool:
            found = list(pool.map(lambda n: entry(n, storage.parquet_metadata(fs, listed[n])), missing))
        write(fs, base, found, kind="recovered")
        recorded.update({r["shard"]: r for r in found})
    return {name: recorded[name] for name in sorted(listed)}, len(missing)


def t5_captions(shards: dict[str, dict]) -> Counter[str]:
    """Shards per ``t5_caption``."""
    return Counter(r["t5_caption"] for r in shards.values())


def column_bytes(shards: dict[str, dict]) -> tuple[int, dict[str, float]]:
    """(rows, compressed bytes per clip of each column) over ``shards``."""
    totals: Counter[str] = Counter()
    rows = 0
    for r in shards.values():
        rows += r["rows"]
        totals.update(json.loads(r["column_bytes"]))
    return rows, {k: round(v / max(rows, 1), 1) for k, v in sorted(totals.items())}
