"""Scale benchmark of the preprocessing job's manifests, pass-1 bookkeeping and global dedup. Prints ONE JSON line.

    python tests/bench/bench_dedup_scale.py [--sizes 100000 1000000] [--partition-rows 100000] [--workdir DIR]

For each size N: a synthetic generic CSV manifest of N records with planted exact and near copies
(``tests/helpers/synthetic_dedup.py``: 3 in 50 records are copies (exact, near, trimmed), known ground truth; no video is
decoded: pass 1's hasher derives the hashes from the id) goes through the job's own code on a local
two-node cluster (``cluster/local.py``, its own state folder and ports): the manifests read by Ray
tasks (:func:`pipelines.global_plan.read_records`), pass 1 with its ``_hashes/`` cache
(:func:`pipelines.stages.hash_and_cache` with the synthetic hasher) and the global plan
(:func:`pipelines.global_plan.plan`: ids, exact and near duplicates), then ``duplicates.parquet`` written
by a worker. Each size runs in a fresh driver process, whose peak RSS (``ru_maxrss``) and wall time are
reported; recall of the planted pairs and false merges are checked against ``duplicates.parquet`` by
this process afterwards (so the check does not count in the driver's memory).

Goals: driver peak RSS flat (<= 1.2x from the smallest to the largest size), time <= 12x for
10x rows, recall 1.0, no false merges.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def driver(manifest: str, output: str, address: str, partition_rows: int) -> None:
    """One job run in this process (the measured driver); prints one JSON line."""
    import ray

    from helpers import synthetic_dedup as sd
    from pipelines import global_plan
    from pipelines.config import PreprocessConfig
    from pipelines.plan import DUPLICATES_SCHEMA

    started = time.perf_counter()
    ray.init(address=address, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": f"{REPO / 'tests'}:{REPO}", "OMP_NUM_THREADS": "1"}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    rss_after_init = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = PreprocessConfig()
    profile = cfg.profile.stage_dict()
    t0 = time.perf_counter()
    records = global_plan.read_records([manifest], profile, None)
    t_manifests = time.perf_counter() - t0
    gp = global_plan.plan(records, output=output, s3_endpoint=None, profile=profile, partition_rows=partition_rows,
                          threshold=cfg.dedup_threshold, bands=cfg.dedup_bands,
                          hash_kwargs={"hasher": sd.hasher}, hash_stage={"batch_size": 4096})
    ray.get(global_plan.write_table.remote(gp.duplicates, output, "duplicates.parquet", None, DUPLICATES_SCHEMA))
    todo = gp.todo.count()
    seconds = time.perf_counter() - started
    print("DRIVER " + json.dumps({
        "seconds": round(seconds, 1), "manifests_s": round(t_manifests, 1), "todo": todo, "counts": gp.counts,
        "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "driver_rss_after_ray_init_mb": round(rss_after_init / 1024, 1),
    }), flush=True)
    ray.shutdown()


def check(out: Path, n: int) -> dict:
    """Recall of the planted copies and false merges, from ``duplicates.parquet``."""
    import pyarrow.parquet as pq

    from helpers import synthetic_dedup as sd
    from pipelines.config import PreprocessConfig

    profile = PreprocessConfig().profile.stage_dict()
    want = sd.expected_duplicates(n, profile)
    t = pq.read_table(out / "duplicates.parquet")
    got = dict(zip(t.column("clip_id").to_pylist(), zip(t.column("kept_clip_id").to_pylist(),
                                                      t.column("kind").to_pylist(), strict=True), strict=True))
    found = sum(got.get(c) == w for c, w in want.items())
    return {"planted": len(want), "recall": round(found / max(len(want), 1), 6),
            "false_merges": sum(1 for c, g in got.items() if want.get(c) != g)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--partition-rows", type=int, default=100_000, help="the job's plan_partition_rows")
    p.add_argument("--workdir", default=None)
    p.add_argument("--driver", nargs=4, metavar=("MANIFEST", "OUTPUT", "ADDRESS", "ROWS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.driver:
        driver(*args.driver[:3], int(args.driver[3]))
        return 0

    from helpers import synthetic_dedup as sd

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-dedup-"))
    env = dict(os.environ, FDREAMER_CLUSTER_DIR=str(work / "cluster"), FDREAMER_DASHBOARD_PORT=str(_free_port()),
               RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    local = [sys.executable, str(REPO / "cluster" / "local.py")]
    subprocess.run([*local, "up"], env=env, check=True, stdout=subprocess.DEVNULL)
    results = []
    try:
        state = json.loads((work / "cluster" / "cluster.json").read_text())
        for n in args.sizes:
            manifest = sd.write_manifest(work / f"m{n}.csv", n)
            out = work / f"out{n}"
            proc = subprocess.run([sys.executable, __file__, "--driver", str(manifest), str(out), state["address"],
                                   str(args.partition_rows)], env=env, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"driver failed at {n} rows")
            res = json.loads(proc.stdout.split("DRIVER ", 1)[1].splitlines()[0])
            results.append({"rows": n, **res, **check(out, n)})
            print(f"bench_dedup_scale: {n} rows: {results[-1]['seconds']} s, driver peak "
                  f"{results[-1]['driver_peak_rss_mb']} MB", file=sys.stderr, flush=True)
    finally:
        subprocess.run([*local, "down"], env=env, check=False, stdout=subprocess.DEVNULL)
    first, last = results[0], results[-1]
    summary = {
        "bench": "dedup_scale", "cluster": "local 2 nodes x 2 CPUs (one 2-core machine)",
        "partition_rows": args.partition_rows, "sizes": results,
        "rss_ratio": round(last["driver_peak_rss_mb"] / first["driver_peak_rss_mb"], 3),
        "time_ratio": round(last["seconds"] / first["seconds"], 2), "rows_ratio": last["rows"] / first["rows"],
        "recall_min": min(r["recall"] for r in results), "false_merges": sum(r["false_merges"] for r in results),
    }
    print(json.dumps(summary))
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
