"""The preprocessing job graph on Ray Data (called by ``pipelines/preprocess.py``).

Pass 1 (``hash_and_cache``, CPU tasks): manifest records -> per-clip hashes or quarantine rows,
persisted per block under ``_hashes/``. Only ids + metadata + hashes (~100 bytes a clip) come back
to the driver, where exact and near duplicates are resolved globally and the kept rows get the
captions of their exact copies (:func:`pipelines.plan.plan_pass2`).
Pass 2: kept clips not yet in a completed shard -> decode (CPU tasks) -> encoder actor pool (models
loaded once per actor) -> optical flow (CPU tasks) -> Parquet shards written by tasks (atomic: temp
name then rename locally, one upload on S3; :mod:`fdreamer.data.storage`). A task with the encoder
resources writes ``null_conditions.safetensors`` once. Then ``duplicates.parquet``,
``quarantine.parquet``, ``summary.json`` (also logged to MLflow when configured) and finally
``_SUCCESS`` (JSON with the counts). The output is a local folder or ``s3://bucket/prefix``.

Resume: clip ids found in completed ``shards/part-*.parquet`` files are skipped and pass-1 results
are read back from ``_hashes/``, so a rerun after a crash decodes and writes only what is missing
and never duplicates a row. Each shard records the ``t5_caption`` its ``t5`` column was encoded
with; a rerun with the other option fails (:class:`OutputMismatchError`) before touching the output,
so T5 encodings of the other text are never reused or mixed in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import ray

from fdreamer.config import to_dict
from fdreamer.data import schema, storage
from fdreamer.data.manifests import ManifestRecord, read_manifests
from fdreamer.encoders import vae_downsample_factor
from pipelines import stages
from pipelines.config import PreprocessConfig
from pipelines.plan import DUPLICATES_SCHEMA, plan_pass2

logger = logging.getLogger(__name__)


def record_key(rec: dict, profile: dict) -> str:
    """Key of one manifest record under one sampling profile (the pass-1 cache key).

    ``kind`` enters the key only for images, so video records keep the keys (and the ``_hashes/``
    cache) of outputs written before image records existed.
    """
    prof = {k: v for k, v in sorted(profile.items()) if k != "decode_timeout_s"}
    skip = {"record_key"} | ({"kind"} if rec.get("kind", "video") == "video" else set())
    text = json.dumps({"record": {k: rec[k] for k in sorted(rec) if k not in skip}, "profile": prof},
                      sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()


class OutputMismatchError(ValueError):
    """The output folder holds shards written with settings this run would contradict."""


def completed_shards(fs: pafs.FileSystem, base: str) -> tuple[set[str], Counter[str]]:
    """(clip ids, shards per ``t5_caption``) of the complete shards under ``base/shards`` (temp files ignored)."""
    done: set[str] = set()
    t5_captions: Counter[str] = Counter()
    for f in storage.list_files(fs, storage.join(base, "shards"), "part-", ".parquet"):
        table = storage.read_parquet(fs, f, columns=["clip_id"])
        done.update(table.column("clip_id").to_pylist())
        t5_captions[schema.shard_t5_caption(table.schema.metadata)] += 1
    return done, t5_captions


def check_t5_caption(output: str, t5_caption: str, shards: Counter[str]) -> None:
    """OutputMismatchError unless every complete shard's ``t5`` was encoded with ``t5_caption``.

    Resuming would otherwise keep those clips' T5 of the other text (they count as done) and mix
    two encodings in one output.
    """
    other = {k: n for k, n in sorted(shards.items()) if k != t5_caption}
    if other:
        found = ", ".join(f"{n} shard(s) with t5_caption={k}" for k, n in other.items())
        raise OutputMismatchError(
            f"output {output} holds {found}, whose t5 column encodes another text than this run's "
            f"t5_caption={t5_caption}; write to a new output folder, or rerun with the output's t5_caption")


def _rows_per_shard(cfg: PreprocessConfig) -> int:
    """Rows per shard from ``shard_target_bytes`` and the fp16 tensor sizes of one clip."""
    enc = cfg.resolved_encoders()
    factor, text_width = 8, 768
    if (Path(enc.vae or "") / "config.json").is_file():
        factor = vae_downsample_factor(enc.vae)
    text_cfg = Path(enc.text_encoder or "") / "config.json"
    if text_cfg.is_file():
        text_width = int(json.loads(text_cfg.read_text()).get("hidden_size", text_width))
    t, hw = cfg.profile.num_frames, (cfg.profile.size // factor) ** 2
    row = 2 * (4 * t * hw + 4 * hw + 2 * (t - 1) * hw + enc.clip_max_length * text_width) + 64 * 1024  # + T5 etc.
    return max(1, min(100_000, cfg.shard_target_bytes // row))


def _stage_kwargs(stage: Any) -> dict:
    return {"concurrency": stage.concurrency, "num_cpus": stage.num_cpus, "batch_size": stage.batch_size,
            **({"num_gpus": stage.num_gpus} if stage.num_gpus else {})}


def _collect(ds: ray.data.Dataset) -> pa.Table:
    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    return pa.concat_tables(tables) if tables else pa.table({})


def _column_bytes(fs: pafs.FileSystem, base: str) -> tuple[int, dict[str, float]]:
    """(rows, compressed bytes per clip of each column) over all complete shards."""
    totals: Counter[str] = Counter()
    rows = 0
    for f in storage.list_files(fs, storage.join(base, "shards"), "part-", ".parquet"):
        meta = storage.parquet_metadata(fs, f)
        rows += meta.num_rows
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            for c in range(rg.num_columns):
                col = rg.column(c)
                totals[col.path_in_schema.split(".")[0]] += col.total_compressed_size
    return rows, {k: round(v / max(rows, 1), 1) for k, v in sorted(totals.items())}


def _per_stage(rows: list[dict], stage_names: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Worker seconds and clips per worker-second of each stage, from the rows' ``sec_<stage>``."""
    out = {}
    for name in stage_names:
        secs = [float(r.get(f"sec_{name}") or 0.0) for r in rows]
        total = sum(secs)
        out[name] = {"clips": len(secs), "worker_s": round(total, 3),
                     "clips_per_worker_s": round(len(secs) / total, 2) if total > 0 else 0.0}
    return out


def _hash_pass(cfg: PreprocessConfig, records: list[ManifestRecord], profile: dict) -> tuple[list[dict], list[dict]]:
    """Pass-1 rows for every record, in manifest order, hashing only what the cache lacks.

    Returns (rows, rows hashed by this run). Rows of a record listed twice appear twice.
    """
    items = [dict(r) | {"record_key": record_key(dict(r), profile)} for r in records]
    keys = {it["record_key"] for it in items}
    cached = stages.read_hash_cache(cfg.output, cfg.s3_endpoint, keys)
    todo: dict[str, dict] = {}
    for it in items:
        if it["record_key"] not in cached:
            todo.setdefault(it["record_key"], it)  # each distinct record once
    fresh: dict[str, list[dict]] = {}
    if todo:
        dec = cfg.stages.decode
        ds = ray.data.from_items(list(todo.values()), override_num_blocks=max(1, min(len(todo), 4 * dec.concurrency)))
        hashed = ds.map_batches(stages.hash_and_cache, batch_format="pyarrow",
                                fn_kwargs={"profile": profile, "output": cfg.output, "s3_endpoint": cfg.s3_endpoint},
                                **_stage_kwargs(dec))
        for r in _collect(hashed).to_pylist():
            fresh.setdefault(r["record_key"], []).append(r)
    rows: list[dict] = []
    for it in items:
        key = it["record_key"]
        rows += [dict(r) for r in (cached.get(key) or fresh.get(key) or [])]
    return rows, [r for rs in fresh.values() for r in rs]


def run(cfg: PreprocessConfig, records: list[ManifestRecord] | None = None) -> dict[str, Any]:
    """Run the whole job against the connected Ray cluster; returns (and writes) the summary.

    ``records`` are the already-read manifest records (read here when None).
    """
    started = time.perf_counter()
    cfg.check_ready()
    fs, base = storage.resolve(cfg.output, cfg.s3_endpoint)
    storage.makedirs(fs, storage.join(base, "shards"))
    done, shard_t5 = completed_shards(fs, base)
    check_t5_caption(cfg.output, cfg.t5_caption, shard_t5)  # before the output is touched
    if storage.exists(fs, storage.join(base, "_SUCCESS")):
        fs.delete_file(storage.join(base, "_SUCCESS"))  # a rerun is unfinished until it writes it again
    if records is None:
        records = read_manifests(cfg.inputs, cfg.s3_endpoint)  # fails fast with ManifestError
    profile = cfg.profile.stage_dict()
    dec = cfg.stages.decode
    enc_stage = cfg.stages.encode
    enc_cfg = dataclasses.asdict(cfg.resolved_encoders())

    # The empty caption's encodings (CFG null condition), once per output, on the encoder resources.
    null_path = storage.join(base, schema.NULL_CONDITIONS_FILE)
    null_ref = None
    if not storage.exists(fs, null_path):
        null_ref = ray.remote(stages.null_conditions_bytes).options(
            num_cpus=enc_stage.num_cpus, num_gpus=enc_stage.num_gpus or 0).remote(enc_cfg)

    # ---- pass 1: hashes (small table; cached under _hashes/ for reruns) ----
    t_pass1 = time.perf_counter()
    table, fresh_rows = _hash_pass(cfg, records, profile)
    t_pass1 = time.perf_counter() - t_pass1
    plan = plan_pass2(table, done, cfg.dedup_threshold, cfg.dedup_bands)
    quarantined, duplicates, already, todo = plan.quarantined, plan.duplicates, plan.already, plan.todo

    # ---- pass 2: decode -> encode (actors) -> flow -> shards ----
    t_pass2 = time.perf_counter()
    written: list[dict] = []
    results: list[dict] = []
    if todo:
        kept = ray.data.from_items(todo, override_num_blocks=max(1, min(len(todo), 4 * dec.concurrency)))
        res = (
            kept.map_batches(stages.decode_clips, batch_format="pyarrow",
                             fn_kwargs={"profile": profile, "s3_endpoint": cfg.s3_endpoint}, **_stage_kwargs(dec))
            .map_batches(stages.EncodeClips, batch_format="pyarrow",
                         fn_constructor_kwargs={"encoder_cfg": enc_cfg, "t5_caption": cfg.t5_caption},
                         **_stage_kwargs(enc_stage))
            .map_batches(stages.add_flow, batch_format="pyarrow", **_stage_kwargs(cfg.stages.flow))
            .map_batches(stages.write_shard, batch_format="pyarrow", batch_size=_rows_per_shard(cfg),
                         fn_kwargs={"output": cfg.output, "s3_endpoint": cfg.s3_endpoint,
                                    "t5_caption": cfg.t5_caption},
                         concurrency=cfg.stages.write.concurrency, num_cpus=cfg.stages.write.num_cpus)
        )
        results = _collect(res).to_pylist()
        for r in results:
            (written if r["status"] == stages.OK else quarantined).append(r)
    t_pass2 = time.perf_counter() - t_pass2
    if null_ref is not None:
        storage.write_bytes(fs, null_path, ray.get(null_ref))

    # ---- side tables, summary, _SUCCESS last ----
    q_schema = pa.schema([(n, pa.string()) for n in ("clip_id", "uri", "reason", "detail")])
    storage.write_parquet(fs, storage.join(base, "quarantine.parquet"), pa.Table.from_pylist(
        [{k: r[k] for k in q_schema.names} for r in quarantined], schema=q_schema))
    storage.write_parquet(fs, storage.join(base, "duplicates.parquet"),
                          pa.Table.from_pylist(duplicates, schema=DUPLICATES_SCHEMA))
    rows_total, col_bytes = _column_bytes(fs, base)
    stage_stats = _per_stage(fresh_rows, ("hash",)) | _per_stage(results, ("decode", "encode", "flow", "write"))
    seconds = time.perf_counter() - started
    fallbacks = sum(bool(r["t5_fallback"]) for r in written)
    if fallbacks:
        print(f"preprocess: t5_caption={cfg.t5_caption}: {fallbacks} of {len(written)} written clips have no "
              "motion_caption; their t5 encodes caption (summary.json: t5_caption_fallbacks)",
              file=sys.stderr, flush=True)
    if plan.dedup.get("oversized_buckets"):
        print(f"preprocess: {plan.dedup['oversized_buckets']} near-duplicate band bucket(s) with "
              f"{plan.dedup['oversized_bucket_members']} members in all exceeded the bucket cap; they were checked "
              "in windows of the hash order (summary.json: dedup)", file=sys.stderr, flush=True)
    summary = {
        "schema_version": schema.SCHEMA_VERSION,
        "inputs": len(records),
        "clips": len(table),  # quarantined videos count once each
        "written": len(written),
        "already_done": len(already),
        "duplicates": len(duplicates),
        "duplicates_by_kind": dict(Counter(d["kind"] for d in duplicates)),
        "dedup": plan.dedup,  # band buckets, pairs checked, oversized buckets (checked in windows) and their members
        "quarantined": len(quarantined),
        "quarantined_by_reason": dict(Counter(r["reason"] for r in quarantined)),
        "t5_caption": cfg.t5_caption,
        "t5_caption_fallbacks": fallbacks,  # written by this run with t5 of caption for lack of a motion_caption
        "rows_in_shards": rows_total,
        "records_hashed": len({r["record_key"] for r in fresh_rows}),  # others: from the _hashes/ cache
        "bytes_per_clip_by_column": col_bytes,
        "stages": stage_stats,
        "pass1_s": round(t_pass1, 2),
        "pass2_s": round(t_pass2, 2),
        "clips_per_s": round(len(written) / t_pass2, 2) if written and t_pass2 > 0 else 0.0,
        "seconds": round(seconds, 2),
        "output": str(cfg.output),
    }
    text = json.dumps(summary, indent=2) + "\n"
    storage.write_bytes(fs, storage.join(base, "summary.json"), text.encode())
    print(text, end="", flush=True)
    _log_mlflow(cfg, summary)
    storage.write_bytes(fs, storage.join(base, "_SUCCESS"), text.encode())
    return summary


def summary_metrics(summary: dict) -> dict[str, float]:
    """The summary's numbers as flat MLflow metric names (``quarantined.missing``, ``stage.encode.worker_s``)."""
    out: dict[str, float] = {}
    for k, v in summary.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[k] = float(v)
        elif k in ("quarantined_by_reason", "duplicates_by_kind"):
            out |= {f"{k.split('_by_')[0]}.{sub}": float(n) for sub, n in v.items()}
        elif k == "bytes_per_clip_by_column":
            out |= {f"bytes_per_clip.{col}": float(n) for col, n in v.items()}
        elif k == "dedup":
            out |= {f"dedup.{m}": float(n) for m, n in v.items()}
        elif k == "stages":
            out |= {f"stage.{st}.{m}": float(n) for st, d in v.items() for m, n in d.items()}
    return out


def _log_mlflow(cfg: PreprocessConfig, summary: dict) -> None:
    """Log the config (params), the summary (metrics + summary.json artifact) to MLflow when configured."""
    if not cfg.mlflow_tracking_uri:
        return
    try:
        import mlflow
    except ImportError:
        logger.warning("mlflow_tracking_uri is set but mlflow is not installed; skipping")
        return
    from fdreamer.config import flatten

    try:
        mlflow.set_tracking_uri(cfg.mlflow_tracking_uri)
        mlflow.set_experiment(cfg.mlflow_experiment)
        with mlflow.start_run(run_name="preprocess"):
            mlflow.log_params({k: str(v)[:500] for k, v in flatten(to_dict(cfg)).items()})
            mlflow.log_metrics(summary_metrics(summary))
            mlflow.log_dict(summary, "summary.json")
    except Exception as exc:  # noqa: BLE001 - the data is written; a tracking outage must not fail the job
        logger.warning("could not log the summary to MLflow at %s: %s", cfg.mlflow_tracking_uri, exc)
        print(f"preprocess: MLflow logging failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
