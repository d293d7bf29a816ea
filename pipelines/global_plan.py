"""The job's global plan on Ray Data: manifests -> pass 1 (with its cache) -> ids, exact and near duplicates.

Nothing here holds a row per clip on the driver. The stages are :mod:`pipelines.plan_stages` functions,
each run once per partition of ``ceil(records / plan_partition_rows)`` hash partitions of its key, which
hold complete groups of the key. The rows reach their partition through storage
(:mod:`pipelines.shuffle`: map tasks write per-partition files, one task per partition reads them), not
through Ray Data's shuffles, whose intermediate blocks the driver would own; the driver sums one row of
counts per task as the stages stream and holds the materialized outputs' block references (one per
partition).

Order: manifests read by tasks, one per manifest (:func:`read_records`; a bad record fails the job
with the manifest, line and field) -> cache lookup (key ``record_key``) -> pass 1 on the records the
cache lacks (``hash_fn``, by default :func:`pipelines.stages.hash_and_cache`) -> ``first_of_each_id``
(key ``clip_id``, with the ids of complete shards as ``done`` markers) -> ``exact_groups`` (key
``content_hash``) -> ``near_edges`` (key ``band_key``) -> edges to the driver (bounded: one row per
near-duplicate pair) -> ``apply_near`` -> the split into pass-2 input, duplicates, quarantine.
"""

from __future__ import annotations

import math
import re
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray

from fdreamer.data import storage
from fdreamer.data.inputs import expand_inputs, read_input
from fdreamer.data.manifests import ManifestError
from fdreamer.data.splits import DEFAULT_FRACTION, assign_split
from pipelines import plan_stages as ps
from pipelines import shuffle, stages
from pipelines.plan import DUPLICATES_SCHEMA

ROW_BITS = 40  # row_order = manifest index << ROW_BITS | row within the manifest
NEAR_SPLIT = 4  # the near-duplicate stage's band rows go to this many times the plan's partitions


# ------------------------------------------------------------------------------------------ manifests
def _record_rows(batch: pa.Table, profile: dict, s3_endpoint: str | None, heldout_fraction: float) -> pa.Table:
    """One manifest per row of ``batch`` (``manifest``, ``index``) -> its records as PASS1 rows (``record``);
    a record without a split gets one (:func:`fdreamer.data.splits.assign_split`)."""
    out: list[dict] = []
    for item in batch.to_pylist():
        for n, rec in enumerate(read_input(item["manifest"], s3_endpoint)):
            rec = dict(rec)
            rec["split"] = assign_split(rec["split"], rec["source"], rec["video_id"], heldout_fraction)
            out.append({
                "clip_id": "", "source": rec["source"], "video_id": rec["video_id"], "uri": rec["uri"],
                "caption": rec["caption"], "motion_caption": rec["motion_caption"], "split": rec["split"],
                "motion": rec["motion"], "source_width": rec["width"], "source_height": rec["height"],
                "record_key": stages.record_key(rec, profile), "status": ps.RECORD, "kind": rec["kind"],
                "row_order": (int(item["index"]) << ROW_BITS) | n,
            })
    return pa.Table.from_pylist(out, schema=ps.PASS1_SCHEMA)


def _manifest_error(exc: BaseException) -> ManifestError | None:
    """The ManifestError behind a Ray Data task failure, if any (Ray wraps it in a UserCodeException and a
    RayTaskError whose text ends with the original ``...ManifestError: <message>`` line)."""
    found = re.findall(r"ManifestError: (.+)", str(exc))
    return ManifestError(found[-1].strip()) if found else None


def read_records(inputs: list[str], profile: dict, s3_endpoint: str | None,
                 heldout_fraction: float = DEFAULT_FRACTION) -> ray.data.Dataset:
    """Every manifest record as a PASS1 row, read by one task per input (materialized: all checked). Inputs
    are manifests, video2dataset shards or folders of them (:mod:`fdreamer.data.inputs`; a folder is listed
    here and each shard is one input).

    Raises :class:`ManifestError` (manifest, line, field) when any record is bad, before any video is read.
    """
    inputs = expand_inputs(list(inputs), s3_endpoint)
    files = ray.data.from_items([{"manifest": str(u), "index": i} for i, u in enumerate(inputs)],
                                override_num_blocks=len(inputs))
    ds = files.map_batches(_record_rows, batch_size=1, batch_format="pyarrow",
                           fn_kwargs={"profile": profile, "s3_endpoint": s3_endpoint,
                                      "heldout_fraction": heldout_fraction})
    try:
        return ds.materialize()
    except Exception as exc:
        err = _manifest_error(exc)
        if err is not None:
            raise err from None
        raise


# ------------------------------------------------------------------------------------------- pass 1
def _read_cache_files(batch: pa.Table, s3_endpoint: str | None) -> pa.Table:
    """Pass-1 cache files (one path per row) -> their rows as PASS1 rows; unreadable or older files skipped."""
    tables = []
    for path in batch.column("path").to_pylist():
        fs, file = storage.resolve(path, s3_endpoint)
        try:
            t = storage.read_parquet(fs, file)
        except Exception:  # noqa: BLE001 - an unreadable cache file only costs re-hashing
            continue
        if t.schema.names == stages.HASH_SCHEMA.names:
            tables.append(ps._conform(t, ps.PASS1_SCHEMA))
    return pa.concat_tables(tables) if tables else ps.PASS1_SCHEMA.empty_table()


def _hash_records(batch: pa.Table, hash_fn: Callable[..., pa.Table], fn_kwargs: dict) -> pa.Table:
    """PASS1 ``record`` rows -> their pass-1 rows, stamped with each record's row_order and kind.

    ``hash_fn`` runs once per batch over its distinct records (it also persists them to the cache); a
    video listed twice gets its rows twice, each with its own record's row_order and labels (caption, ...).
    """
    records = batch.to_pylist()
    distinct = {r["record_key"]: dict(r, width=r["source_width"], height=r["source_height"]) for r in records}
    rows = hash_fn(pa.Table.from_pylist(list(distinct.values())), **fn_kwargs)
    by_key: dict[str, list[int]] = {}
    for i, key in enumerate(rows.column("record_key").to_pylist()):
        by_key.setdefault(key, []).append(i)
    take: list[int] = []
    from_record: dict[str, list] = {"row_order": [], "kind": [], **{f: [] for f in stages.LABEL_FIELDS}}
    for r in records:
        idx = by_key.get(r["record_key"], [])
        take += idx
        for name, values in from_record.items():
            values += [r[name]] * len(idx)  # each record's own position, kind and labels (caption, ...)
    out = rows.take(pa.array(take, pa.int64())).drop_columns([c for c in from_record if c in rows.column_names])
    for name, values in from_record.items():
        out = out.append_column(name, pa.array(values, ps.PASS1_SCHEMA.field(name).type))
    return ps._conform(out, ps.PASS1_SCHEMA)


def _done_markers(batch: pa.Table, s3_endpoint: str | None) -> pa.Table:
    """Shard files (one path per row) -> one ``done`` PASS1 row per clip id in them."""
    ids: list[str] = []
    for path in batch.column("path").to_pylist():
        fs, p = storage.resolve(path, s3_endpoint)
        ids += storage.read_parquet(fs, p, columns=["clip_id"]).column("clip_id").to_pylist()
    n = len(ids)
    return ps._conform(pa.table({"clip_id": pa.array(ids, pa.string()), "status": pa.array([ps.DONE] * n)}),
                       ps.PASS1_SCHEMA)


def _uri(output: str, path: str) -> str:
    """A listed path as a URI the workers can resolve again (``s3://`` for S3 outputs)."""
    return f"s3://{path}" if storage.is_s3(output) else path


# ------------------------------------------------------------------------------ pass-1 cache compaction
def _write_cache_file(batch: pa.Table, output: str, s3_endpoint: str | None) -> pa.Table:
    """One compacted cache file of ``batch`` (``_hashes/part-<sha1 of its keys>``: a retried write replaces
    it); returns its name (no row when the block is empty)."""
    if not batch.num_rows:
        return pa.table({"name": pa.array([], pa.string())})
    fs, base = storage.resolve(output, s3_endpoint)
    keys = [f"{k}/{c}" for k, c in zip(batch.column("record_key").to_pylist(), batch.column("clip_id").to_pylist(),
                                        strict=True)]
    name = stages.part_name(keys)
    storage.write_parquet(fs, storage.join(base, stages.HASH_DIR, name), batch, compression="zstd")
    return pa.table({"name": [name]})


@ray.remote(num_cpus=0.25)
def _prune_cache(output: str, s3_endpoint: str | None, keep: list[str]) -> int:
    """Delete every ``_hashes/`` file but the compacted ones (listed by this worker, not the driver)."""
    fs, base = storage.resolve(output, s3_endpoint)
    old = [p for p in storage.list_files(fs, storage.join(base, stages.HASH_DIR), "part-", ".parquet")
           if p.rsplit("/", 1)[-1] not in set(keep)]
    for p in old:
        fs.delete_file(p)
    return len(old)


def compact_cache(sh: shuffle.StorageShuffle, output: str, s3_endpoint: str | None) -> dict:
    """Rewrite the pass-1 cache as one file per plan partition from the ``cache`` stage that pass 1 scattered
    (``plan_stages.cache_rows``), then delete the per-batch files it replaces.

    Pass 1 persists one small file per hash batch (a crash loses at most a batch); a 19M-clip run leaves
    millions of them. Compacted, a rerun lists and reads ``partitions`` files (about ``plan_partition_rows``
    rows each). A crash between the write and the delete leaves rows cached twice, which the next lookup
    reads once (``cache_rows`` and the ids stage keep one row per record key and clip).
    """
    written = sh.read("cache", ps.PASS1_SCHEMA, ps.cache_rows).map_batches(
        _write_cache_file, batch_size=None, batch_format="pyarrow",
        fn_kwargs={"output": output, "s3_endpoint": s3_endpoint})
    names = [r["name"] for r in written.take_all()]  # one per partition
    sh.drop("cache")
    return {"cache_files": len(names), "cache_files_removed": ray.get(_prune_cache.remote(output, s3_endpoint, names))}


# --------------------------------------------------------------------------------------------- plan
@dataclass
class GlobalPlan:
    """The plan's outputs: datasets in the cluster (materialized) and counts."""

    todo: ray.data.Dataset  # PLAN rows pass 2 writes
    duplicates: ray.data.Dataset  # DUPLICATES_SCHEMA rows
    quarantined: ray.data.Dataset  # PLAN rows of pass-1 failures
    counts: dict[str, Any] = field(default_factory=dict)


def _tally(batch: pa.Table) -> pa.Table:
    """One row of counts per block (what the summary needs), so the driver sums O(blocks) rows as they stream."""
    role, status = batch.column("role").to_pylist(), batch.column("status").to_pylist()
    done, kind, reason = (batch.column(c).to_pylist() for c in ("done", "dup_kind", "reason"))
    c: Counter[str] = Counter()
    for r, d, k, q in zip(role, done, kind, reason, strict=True):
        if r == ps.KEEP:
            c["already" if d else "todo"] += 1
        elif r == ps.DUP:
            c["already" if d and k != "same_id" else f"dup:{k}"] += 1
        else:
            c[f"quarantined:{q}"] += 1
    c["clips"] = len(status)
    cuts = batch.column("shot_cuts")  # per video, on its first clip's row (pass 1)
    c["shot_cuts"] = int(pc.sum(cuts).as_py() or 0)
    c["shot_videos_cut"] = int(pc.sum(pc.greater(cuts, 0)).as_py() or 0)
    c["shot_dropped_frames"] = int(pc.sum(batch.column("shot_dropped_frames")).as_py() or 0)
    return shuffle.counts_row(c)


def _hash_tally(batch: pa.Table) -> dict[str, int]:
    """Counts of freshly hashed rows of a map bundle: distinct records, rows and worker microseconds of pass 1."""
    return {"records": len(set(batch.column("record_key").to_pylist())), "hash_rows": batch.num_rows,
            "hash_us": int(1e6 * float(pc.sum(batch.column("sec_hash")).as_py() or 0.0))}


def _apply_near(batch: pa.Table, dropped: ray.ObjectRef, threshold: float) -> pa.Table:
    return ps.apply_near(batch, ray.get(dropped), threshold)  # the dropped table is put once, not sent with every task


def _is(column: str, value: str) -> Callable[[pa.Table], pa.Table]:
    return lambda t: t.filter(pc.equal(t.column(column), value))


def _is_not(column: str, value: str) -> Callable[[pa.Table], pa.Table]:
    return lambda t: t.filter(pc.not_equal(t.column(column), value))


def _split(batch: pa.Table, part: str) -> pa.Table:
    role, done, kind = batch.column("role"), batch.column("done"), batch.column("dup_kind")
    if part == "todo":
        mask = pc.and_(pc.equal(role, ps.KEEP), pc.invert(done))
    elif part == "duplicates":
        already = pc.and_kleene(done, pc.not_equal(pc.fill_null(kind, ""), "same_id"))
        mask = pc.and_(pc.equal(role, ps.DUP), pc.invert(already))
    else:
        mask = pc.equal(role, ps.QUARANTINE)
    out = batch.filter(mask)
    if part == "duplicates":
        out = pa.table({"clip_id": out.column("clip_id"), "uri": out.column("uri"),
                        "kept_clip_id": out.column("kept_clip_id"), "kind": out.column("dup_kind"),
                        "distance": out.column("distance"), "caption": out.column("caption")},
                       schema=DUPLICATES_SCHEMA)
    return out


class _Clock:
    """Wall seconds of each plan stage since the previous one (``plan_stage_s`` in the counts), and the driver's
    peak RSS once it is done (``plan_stage_driver_rss_mb``: where the driver's memory grew, if it did)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.rss_mb: dict[str, float] = {}
        self.last = time.perf_counter()

    def __call__(self, name: str, value: Any = None) -> Any:
        now = time.perf_counter()
        self.seconds[name] = round(now - self.last, 2)
        self.rss_mb[name] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux
        self.last = now
        print(f"preprocess: plan stage {name} done ({self.seconds[name]} s)", file=sys.stderr, flush=True)
        return value


def plan(records: ray.data.Dataset, *, output: str, s3_endpoint: str | None, profile: dict,
         partition_rows: int, threshold: float, bands: int, max_bucket: int = 10_000,
         hash_fn: Callable[..., pa.Table] = stages.hash_and_cache, hash_kwargs: dict | None = None,
         hash_stage: dict | None = None) -> GlobalPlan:
    """The whole plan (module docstring) from the materialized manifest ``records``."""
    n_records = records.count()
    parts = max(1, math.ceil(n_records / max(partition_rows, 1)))
    fs, base = storage.resolve(output, s3_endpoint)
    cache_files = storage.list_files(fs, storage.join(base, stages.HASH_DIR), "part-", ".parquet")
    shard_files = storage.list_files(fs, storage.join(base, "shards"), "part-", ".parquet")
    shuffle.clear(output, s3_endpoint)  # what a crashed run left in the scratch
    sh = shuffle.StorageShuffle(output, s3_endpoint, parts, partition_rows)

    def files(paths: list[str]) -> ray.data.Dataset:
        return ray.data.from_items([{"path": _uri(output, p)} for p in paths],
                                   override_num_blocks=max(1, min(len(paths), 64 * parts)))

    # ---- pass 1 with its cache ----
    clock = _Clock()
    looked = records
    if cache_files:
        sh.write(records, [("lookup", "record_key")])
        sh.write(files(cache_files).map_batches(_read_cache_files, batch_format="pyarrow",
                                                fn_kwargs={"s3_endpoint": s3_endpoint}), [("lookup", "record_key")])
        looked = sh.read("lookup", ps.PASS1_SCHEMA, ps.lookup_cache).materialize()
        sh.drop("lookup")
    clock("cache_lookup")
    stage = {"batch_size": 8, "num_cpus": 1} | (hash_stage or {})
    to_hash = looked.map_batches(_is("status", ps.RECORD), batch_format="pyarrow").materialize()
    hash_batches = math.ceil(to_hash.count() / stage["batch_size"])  # one cache file per hash batch
    compact = len(cache_files) + hash_batches > 2 * parts  # more files than compacting would leave (x2 slack)
    targets = [("ids", "clip_id")] + ([("cache", "record_key")] if compact else [])
    # pass-1 rows go straight to the ids stage (and the cache compaction); the driver sums count rows
    sh.write(looked.map_batches(_is_not("status", ps.RECORD), batch_format="pyarrow"), targets)
    kwargs = {"profile": profile, "output": output, "s3_endpoint": s3_endpoint} | (hash_kwargs or {})
    # one block per batch: a map task works on one block, so a one-block input would hash serially
    fresh = to_hash.repartition(target_num_rows_per_block=stage["batch_size"]).map_batches(
        _hash_records, batch_format="pyarrow", fn_kwargs={"hash_fn": hash_fn, "fn_kwargs": kwargs}, **stage)
    hashed = sh.write(fresh, targets, tally=_hash_tally)
    clock("pass1")
    compaction = {"cache_files": len(cache_files), "cache_files_removed": 0}
    if compact:
        compaction = clock("compact_cache", compact_cache(sh, output, s3_endpoint))
    if shard_files:
        sh.write(files(shard_files).map_batches(_done_markers, batch_format="pyarrow",
                                                fn_kwargs={"s3_endpoint": s3_endpoint}), [("ids", "clip_id")])

    # ---- ids, exact duplicates, near duplicates ----
    sh.write(sh.read("ids", ps.PASS1_SCHEMA, ps.first_of_each_id), [("exact", "content_hash")], bundle=False)
    sh.drop("ids")
    clock("ids")
    exact = sh.read("exact", ps.PLAN_SCHEMA, ps.exact_groups).materialize()  # one block per partition
    sh.drop("exact")
    clock("exact")
    # ~90 band rows per record (32 clip keys, 60 footage keys on a first clip): more, smaller partitions
    sh.write(exact.map_batches(ps.band_rows, batch_format="pyarrow", fn_kwargs={"bands": bands}),
             [("near", "band_key")], bundle=False, partitions=NEAR_SPLIT * parts)
    edge_tables = [t for t in sh.read("near", ps.BAND_SCHEMA, ps.near_edges, threshold=threshold, bands=bands,
                                      max_bucket=max_bucket).iter_batches(batch_format="pyarrow", batch_size=None)
                   if t.num_rows]
    edges = pa.concat_tables(edge_tables) if edge_tables else ps.EDGE_SCHEMA.empty_table()
    sh.drop()
    clock("near")
    dropped, dedup_stats = ps.resolve_near(edges, threshold)
    final = exact.map_batches(_apply_near, batch_format="pyarrow",
                              fn_kwargs={"dropped": ray.put(dropped), "threshold": threshold}).materialize()
    tally = shuffle.sum_counts(final.map_batches(_tally, batch_size=None, batch_format="pyarrow"))
    clock("apply_near")
    counts = {
        "clips": tally.pop("clips", 0), "todo": tally.pop("todo", 0), "already": tally.pop("already", 0),
        "shots": {"cuts": tally.pop("shot_cuts", 0), "videos_with_cuts": tally.pop("shot_videos_cut", 0),
                  "dropped_frames": tally.pop("shot_dropped_frames", 0)},
        "duplicates_by_kind": {k.split(":", 1)[1]: n for k, n in sorted(tally.items()) if k.startswith("dup:")},
        "quarantined_by_reason": {k.split(":", 1)[1]: n for k, n in sorted(tally.items())
                                  if k.startswith("quarantined:")},
        "dedup": dedup_stats, "near_edges": edges.num_rows - edges.column("a_clip_id").null_count, "partitions": parts,
        "records_hashed": hashed.get("records", 0), "hash_rows": hashed.get("hash_rows", 0),
        "hash_worker_s": hashed.get("hash_us", 0) / 1e6, "plan_stage_s": clock.seconds,
        "plan_stage_driver_rss_mb": clock.rss_mb, "cache": compaction,
    }
    return GlobalPlan(
        todo=final.map_batches(_split, batch_format="pyarrow", fn_kwargs={"part": "todo"}),
        duplicates=final.map_batches(_split, batch_format="pyarrow", fn_kwargs={"part": "duplicates"}),
        quarantined=final.map_batches(_split, batch_format="pyarrow", fn_kwargs={"part": "quarantine"}),
        counts=counts,
    )


@ray.remote(num_cpus=0.25)
def write_table(ds: ray.data.Dataset, output: str, name: str, s3_endpoint: str | None, table_schema: pa.Schema) -> int:
    """``ds`` as one Parquet file ``<output>/<name>``, gathered and written by a worker (atomic, as every
    output file), not by the driver; returns its rows."""
    fs, base = storage.resolve(output, s3_endpoint)
    tables = [t.select(table_schema.names).cast(table_schema)
              for t in ds.iter_batches(batch_format="pyarrow", batch_size=None) if t.num_rows]
    table = pa.concat_tables(tables) if tables else table_schema.empty_table()
    storage.write_parquet(fs, storage.join(base, name), table)
    return table.num_rows


