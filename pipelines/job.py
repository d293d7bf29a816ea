"""The preprocessing job graph on Ray Data (called by ``pipelines/preprocess.py``).

Manifests and pass 1 (:mod:`pipelines.global_plan`): manifests read by one task each; each record's
pass-1 rows (per-clip hashes, or one quarantine row per bad video: ``hash_and_cache``, CPU tasks) come
from the ``_hashes/`` cache or are computed and persisted there; ids, exact and near duplicates are
resolved in the cluster (hash partitions of each key, shuffled through ``<output>/_plan``), and the kept rows
get the captions of their exact copies. The driver receives counts and the near-duplicate edges only.
Pass 2: kept clips not yet in a completed shard -> decode + optical flow (CPU tasks: the frames are
decoded once, flow is computed beside them) -> encoder actor pool (models loaded once per actor) -> Parquet shards written by tasks (atomic: temp
name then rename locally, one upload on S3; :mod:`fdreamer.data.storage`). A task with the encoder
resources writes ``null_conditions.safetensors`` once. Then ``duplicates.parquet`` and
``quarantine.parquet`` (written by workers), ``summary.json`` (also logged to MLflow when configured)
and finally ``_SUCCESS`` (JSON with the counts). The output is a local folder or ``s3://bucket/prefix``.

Resume: clip ids found in completed ``shards/part-*.parquet`` files are skipped (``done`` markers in
the plan) and pass-1 results are read back from ``_hashes/``, so a rerun after a crash decodes and
writes only what is missing and never duplicates a row. Each shard records the ``t5_caption`` its ``t5``
column was encoded with; a rerun with the other option fails (:class:`OutputMismatchError`) before
touching the output, so T5 encodings of the other text are never reused or mixed in. What the shards hold
(rows, ``t5_caption``, bytes per column) comes from the commit ledger (:mod:`pipelines.ledger`: one file per
run, footers read only for shards a crashed run did not record), never from every shard's footer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray

from fdreamer.config import to_dict
from fdreamer.data import schema, storage
from fdreamer.encoders import vae_downsample_factor
from pipelines import global_plan, ledger, shuffle, stages
from pipelines.config import PreprocessConfig
from pipelines.plan import DUPLICATES_SCHEMA
from pipelines.stages import record_key  # noqa: F401 - the pass-1 cache key, re-exported for callers of the job

logger = logging.getLogger(__name__)


class OutputMismatchError(ValueError):
    """The output folder holds shards written with settings this run would contradict."""


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


def _vae_factor(cfg: PreprocessConfig) -> int:
    vae = cfg.resolved_encoders().vae
    return vae_downsample_factor(vae) if (Path(vae or "") / "config.json").is_file() else 8


def _rows_per_shard(cfg: PreprocessConfig) -> int:
    """Rows per shard from ``shard_target_bytes`` and the fp16 tensor sizes of one clip."""
    enc = cfg.resolved_encoders()
    factor, text_width = _vae_factor(cfg), 768
    text_cfg = Path(enc.text_encoder or "") / "config.json"
    if text_cfg.is_file():
        text_width = int(json.loads(text_cfg.read_text()).get("hidden_size", text_width))
    t, hw = cfg.profile.num_frames, (cfg.profile.size // factor) ** 2
    row = 2 * (4 * t * hw + 4 * hw + 2 * (t - 1) * hw + enc.clip_max_length * text_width) + 64 * 1024  # + T5 etc.
    return max(1, min(100_000, cfg.shard_target_bytes // row))


def _stage_kwargs(stage: Any) -> dict:
    return {"concurrency": stage.concurrency, "num_cpus": stage.num_cpus, "batch_size": stage.batch_size,
            **({"num_gpus": stage.num_gpus} if stage.num_gpus else {})}


def encoder_pool(stage: Any, cluster_cpus: float) -> int | tuple[int, int]:
    """The encoder stage's ``concurrency``: as configured, or for CPU actors with ``null`` one actor per CPU the
    cluster has when pass 2 starts (at most what ``num_cpus`` lets fit). Each actor's torch works on one core
    and the encoder is ~3/4 of pass 2's work; measured on 2 CPUs (tests/bench/bench_preprocess.py --marginal):
    an autoscaling pool from 1 stayed at one actor most of the run (1.27x the plain loop), a pool of one actor
    per CPU reached the 2-actor figure."""
    if stage.concurrency is not None:
        return stage.concurrency
    return max(1, min(int(cluster_cpus), int(cluster_cpus // max(stage.num_cpus, 1e-9))))


def _pass2_tally(batch: pa.Table) -> pa.Table:
    """Counts and worker seconds of pass 2 per block (the driver sums O(blocks) rows)."""
    c: Counter[str] = Counter()
    for r in batch.select(["status", "reason", "t5_fallback", *(f"sec_{k}" for k in PASS2_STAGES)]).to_pylist():
        if r["status"] == stages.OK:
            c["written"] += 1
            c["t5_fallbacks"] += bool(r["t5_fallback"])
        else:
            c[f"quarantined:{r['reason']}"] += 1
        c["rows"] += 1
        for k in PASS2_STAGES:
            c[f"us_{k}"] += int(1e6 * (r[f"sec_{k}"] or 0.0))
    return shuffle.counts_row(c)


PASS2_STAGES = ("decode", "encode", "flow", "write")
QUARANTINE_SCHEMA = pa.schema([(n, pa.string()) for n in ("clip_id", "uri", "reason", "detail")])


def _stage_stats(clips: int, worker_s: float) -> dict[str, float]:
    return {"clips": clips, "worker_s": round(worker_s, 3),
            "clips_per_worker_s": round(clips / worker_s, 2) if worker_s > 0 else 0.0}


def run(cfg: PreprocessConfig, records: ray.data.Dataset | None = None,
        hash_fn: Callable[..., pa.Table] | None = None) -> dict[str, Any]:
    """Run the whole job against the connected Ray cluster; returns (and writes) the summary.

    ``records``: the manifests already read (:func:`pipelines.global_plan.read_records`), else read here.
    ``hash_fn``: pass 1's function (default :func:`pipelines.stages.hash_and_cache`; the dedup benchmark
    gives synthetic hashes without decoding).
    """
    started = time.perf_counter()
    cfg.check_ready()
    fs, base = storage.resolve(cfg.output, cfg.s3_endpoint)
    storage.makedirs(fs, storage.join(base, "shards"))
    # the shards already there, from the ledger (footers read only for shards a crashed run did not record)
    committed, recovered = ledger.reconcile(fs, base)
    check_t5_caption(cfg.output, cfg.t5_caption, ledger.t5_captions(committed))  # before the output is touched
    if storage.exists(fs, storage.join(base, "_SUCCESS")):
        fs.delete_file(storage.join(base, "_SUCCESS"))  # a rerun is unfinished until it writes it again
    profile = cfg.profile.stage_dict()
    if records is None:
        records = global_plan.read_records(cfg.inputs, profile, cfg.s3_endpoint, cfg.heldout_fraction)  # ManifestError before decoding
    dec = cfg.stages.decode
    enc_stage = cfg.stages.encode
    enc_cfg = dataclasses.asdict(cfg.resolved_encoders())

    # ---- pass 1 and the global plan (in the cluster; the driver gets counts and near-duplicate edges) ----
    t_pass1 = time.perf_counter()
    gp = global_plan.plan(records, output=cfg.output, s3_endpoint=cfg.s3_endpoint, profile=profile,
                          partition_rows=cfg.plan_partition_rows, threshold=cfg.dedup_threshold,
                          bands=cfg.dedup_bands, hash_fn=hash_fn or stages.hash_and_cache,
                          hash_stage=_stage_kwargs(cfg.stages.hash), hash_kwargs={"fetch": cfg.fetch_dict()})
    t_pass1 = time.perf_counter() - t_pass1
    counts = gp.counts

    # The empty caption's encodings (CFG null condition), once per output, on the encoder resources: started
    # with pass 2, so nothing asks for a GPU during pass 1 (the autoscaler may keep the GPU group at zero).
    null_path = storage.join(base, schema.NULL_CONDITIONS_FILE)
    null_ref = None
    if not storage.exists(fs, null_path):
        null_ref = ray.remote(stages.null_conditions_bytes).options(
            num_cpus=enc_stage.num_cpus, num_gpus=enc_stage.num_gpus or 0).remote(enc_cfg)

    # ---- pass 2: decode + flow -> encode (actors) -> shards ----
    t_pass2 = time.perf_counter()
    p2: Counter[str] = Counter()
    quarantine_parts = [gp.quarantined]
    if counts["todo"]:
        todo = gp.todo.repartition(target_num_rows_per_block=max(1, dec.batch_size))
        latent = cfg.profile.size // _vae_factor(cfg)  # flow at the latents' resolution, beside the decode
        res = (
            todo.map_batches(stages.decode_clips, batch_format="pyarrow",
                             fn_kwargs={"profile": profile, "s3_endpoint": cfg.s3_endpoint,
                                        "flow_size": (latent, latent), "fetch": cfg.fetch_dict()},
                             **_stage_kwargs(dec))
            .map_batches(stages.EncodeClips, batch_format="pyarrow",
                         fn_constructor_kwargs={"encoder_cfg": enc_cfg, "t5_caption": cfg.t5_caption},
                         **(_stage_kwargs(enc_stage) | {"concurrency": encoder_pool(
                             enc_stage, ray.cluster_resources().get("CPU", 1))}))
            .map_batches(stages.write_shard, batch_format="pyarrow", batch_size=_rows_per_shard(cfg),
                         fn_kwargs={"output": cfg.output, "s3_endpoint": cfg.s3_endpoint,
                                    "t5_caption": cfg.t5_caption},
                         concurrency=cfg.stages.write.concurrency, num_cpus=cfg.stages.write.num_cpus)
        ).materialize()
        p2 = shuffle.sum_counts(res.map_batches(_pass2_tally, batch_size=None, batch_format="pyarrow"))
        # this run's shards into the ledger: one row per shard (first row of each), not per clip
        written_shards = [json.loads(r["ledger"]) for r in res.map_batches(
            lambda t: t.filter(pc.is_valid(t.column("ledger"))).select(["ledger"]), batch_format="pyarrow").take_all()]
        ledger.write(fs, base, written_shards)
        quarantine_parts.append(res.map_batches(lambda t: t.filter(pc.equal(t.column("status"), stages.QUARANTINED)),
                                                batch_format="pyarrow"))
    t_pass2 = time.perf_counter() - t_pass2
    if null_ref is not None:
        storage.write_bytes(fs, null_path, ray.get(null_ref))

    # ---- side tables (written by workers), summary, _SUCCESS last ----
    quarantine_ds = quarantine_parts[0].union(*quarantine_parts[1:]) if len(quarantine_parts) > 1 else quarantine_parts[0]
    ray.get([
        global_plan.write_table.remote(quarantine_ds, cfg.output, "quarantine.parquet", cfg.s3_endpoint,
                                       QUARANTINE_SCHEMA),
        global_plan.write_table.remote(gp.duplicates, cfg.output, "duplicates.parquet", cfg.s3_endpoint,
                                       DUPLICATES_SCHEMA),
    ])
    # listed again: a shard another writer completed meanwhile (a task of a killed driver) is recorded too
    committed, late = ledger.reconcile(fs, base)
    recovered += late
    rows_total, col_bytes = ledger.column_bytes(committed)
    reasons = Counter(counts["quarantined_by_reason"])
    reasons.update({k.split(":", 1)[1]: n for k, n in p2.items() if k.startswith("quarantined:")})
    written, fallbacks = p2.get("written", 0), p2.get("t5_fallbacks", 0)
    stage_stats = {"hash": _stage_stats(counts["hash_rows"], counts["hash_worker_s"])} | {
        k: _stage_stats(p2.get("rows", 0), p2.get(f"us_{k}", 0) / 1e6) for k in PASS2_STAGES}
    seconds = time.perf_counter() - started
    if fallbacks:
        print(f"preprocess: t5_caption={cfg.t5_caption}: {fallbacks} of {written} written clips have no "
              "motion_caption; their t5 encodes caption (summary.json: t5_caption_fallbacks)",
              file=sys.stderr, flush=True)
    if counts["dedup"].get("oversized_buckets"):
        print(f"preprocess: {counts['dedup']['oversized_buckets']} near-duplicate band bucket(s) with "
              f"{counts['dedup']['oversized_bucket_members']} members in all exceeded the bucket cap; they were "
              "checked in windows of the hash order (summary.json: dedup)", file=sys.stderr, flush=True)
    summary = {
        "schema_version": schema.SCHEMA_VERSION,
        "inputs": records.count(),
        "clips": counts["clips"],  # pass-1 rows: sampled clips, and one per quarantined video
        "written": written,
        "already_done": counts["already"],
        "duplicates": sum(counts["duplicates_by_kind"].values()),
        "duplicates_by_kind": counts["duplicates_by_kind"],
        "dedup": counts["dedup"],
        # shot cuts found in pass 1 (clips never straddle one) and the frames of shots too short for a clip
        "shots": counts["shots"],  # band buckets, pairs checked, oversized buckets (checked in windows) and their members
        "quarantined": sum(reasons.values()),
        "quarantined_by_reason": dict(sorted(reasons.items())),
        "t5_caption": cfg.t5_caption,
        "t5_caption_fallbacks": fallbacks,  # written by this run with t5 of caption for lack of a motion_caption
        "rows_in_shards": rows_total,
        "ledger": {"shards": len(committed), "recovered": recovered},  # recovered: written by a run that crashed
        "records_hashed": counts["records_hashed"],  # others: from the _hashes/ cache
        "hash_cache": counts["cache"],  # files in _hashes/ after compaction (when it ran) and those it replaced
        "plan_partitions": counts["partitions"],  # 1: the plan ran in one task per stage (a small job)
        "bytes_per_clip_by_column": col_bytes,
        "stages": stage_stats,
        "pass1_s": round(t_pass1, 2),
        "pass2_s": round(t_pass2, 2),
        "clips_per_s": round(written / t_pass2, 2) if written and t_pass2 > 0 else 0.0,
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
        elif k in ("dedup", "hash_cache", "shots"):
            out |= {f"{k}.{m}": float(n) for m, n in v.items()}
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
