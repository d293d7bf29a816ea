"""Benchmark: Ray Data's two Parquet readers on the training job's read. Prints ONE JSON line.

    python tests/bench/bench_read.py [--data PREPROCESSED] [--repeats 3] [--quick]

``training/data.py`` reads the preprocessing job's shards with ``ray.data.read_parquet`` (the training
columns) and, for the tiny configs, materializes them on the driver before Ray Train starts. Ray 2.60 made
its DataSource V2 path (``ListFiles -> ReadFiles``) the default; this times ``read_parquet(...).materialize()``
of the same files and columns with ``DataContext.use_datasource_v2`` True and False, alternating, in one
driver connected to a fresh 2-CPU ``ray start`` head (first read of each kind included: a new training job
pays it). Without ``--data`` it preprocesses 32 sample clips first (``--quick``: 16).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
for p in (str(REPO), str(REPO / "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)


def _timed_reads(address: str, fs: object, files: list[str], columns: list[str], repeats: int) -> dict[str, list[float]]:
    import ray
    import ray.data

    ray.init(address=address, log_to_driver=False)
    out: dict[str, list[float]] = {"v2": [], "v1": []}
    try:
        ctx = ray.data.DataContext.get_current()
        for _ in range(repeats):
            for kind in ("v2", "v1"):
                ctx.use_datasource_v2 = kind == "v2"
                t0 = time.perf_counter()
                ds = ray.data.read_parquet(files, filesystem=fs, columns=columns, shuffle=None).materialize()
                out[kind].append(round(time.perf_counter() - t0, 2))
                assert ds.count() > 0
    finally:
        ray.shutdown()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="a pipelines/preprocess.py output (default: preprocess sample clips)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="16 clips, 2 repeats")
    args = ap.parse_args(argv)

    from helpers.datasets import preprocess_sample
    from helpers.ray_cluster import running_ray_head

    from training.rows import TRAIN_COLUMNS, shard_files

    repeats = 2 if args.quick else args.repeats
    with tempfile.TemporaryDirectory(prefix="bench-read-") as tmp, running_ray_head(Path(tmp) / "head") as head:
        data = args.data or str(preprocess_sample(Path(tmp), head["address"], 16 if args.quick else 32)["output"])
        fs, files = shard_files(data)
        times = _timed_reads(head["address"], fs, files, list(TRAIN_COLUMNS), repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"bench": "read", "files": len(files), "columns": len(TRAIN_COLUMNS),
                      "v2_s": times["v2"], "v1_s": times["v1"], "median_v2_s": med["v2"], "median_v1_s": med["v1"],
                      "v2_over_v1": round(med["v2"] / max(med["v1"], 1e-9), 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
