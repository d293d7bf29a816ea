"""Benchmark: the preprocessing job on https:// inputs vs the same clips as local files. Prints ONE JSON line.

    python tests/bench/bench_http_inputs.py [--sizes 160 640] [--workdir DIR] [--http] [--quick]

The same sample clips (generic manifest, tiny profile, tiny models with the trained VAE) through
``pipelines.job.run`` in a fresh ``ray.init(num_cpus=2)``, at two sizes, once with local paths and once with
every path an ``https://`` link to a loopback HTTPS server (``tests/helpers/http_faults.FaultServer``, a
self-signed certificate given as ``fetch.ca_bundle``; ``--http`` for plain http). Marginal clips/s between
the two sizes (start-up and model loading cancel), and their ratio: the cost of fetching (TLS, the
transfer, twice per video: pass 1 and pass 2) that the decode tasks' prefetch threads (``fetch_ahead``) do
not hide behind decoding. The server runs in this process, so its CPU is part of what the 2 cores share,
which a remote server's would not be: the ratio is a lower bound.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from bench_preprocess import _config, ray_run  # noqa: E402  (the same job runs as the preprocessing bench)


def _manifest(lines: list[str], n: int, out: Path, url_of: object = None) -> Path:
    """The first ``n`` manifest lines, each ``path`` replaced by ``url_of(path)`` when given."""
    rows = [json.loads(line) for line in lines[:n]]
    for r in rows:
        if url_of is not None:
            r["path"] = url_of(r["path"])
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs=2, default=[160, 640])
    p.add_argument("--workdir", default=None)
    p.add_argument("--http", action="store_true", help="plain http instead of https")
    p.add_argument("--quick", action="store_true", help="sizes 32 and 128")
    args = p.parse_args()
    if args.quick:
        args.sizes = [32, 128]

    from helpers.http_faults import FaultServer

    from fdreamer.toy.sample_data import write_sample_data
    from fdreamer.toy.tiny_models import make_tiny_models

    small, large = sorted(args.sizes)
    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
        root = Path(args.workdir or tmp)
        sample = root / "sample"
        write_sample_data(sample, large, workers=1)
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            make_tiny_models(root / "models", seed=0)
        lines = (sample / "manifest.jsonl").read_text().splitlines()
        runs: dict[str, dict[int, dict]] = {"local": {}, "http": {}}
        with FaultServer(sample, https=not args.http) as server:
            extra = () if args.http else (f"--fetch.ca_bundle={server.ca_file}",)

            def url_of(path: str) -> str:
                return server.url(str(Path(path).relative_to(sample.resolve())))

            for n in (small, large):
                for name, of in (("local", None), ("http", url_of)):
                    manifest = _manifest(lines, n, root / f"manifest-{name}-{n}.jsonl", of)
                    cfg = _config(manifest, root / "models", root / f"out-{name}-{n}", 2,
                                  overrides=extra if name == "http" else ())
                    runs[name][n] = ray_run(cfg, 2)
            requests = sum(server.requests.values())
    out: dict = {"bench": "http_inputs", "profile": "tiny", "sizes": [small, large], "cpu_count": os.cpu_count(),
                 "scheme": "http" if args.http else "https", "http_requests": requests}
    for name, by_size in runs.items():
        a, b = by_size[small], by_size[large]
        out[f"{name}_seconds"] = [round(a["seconds"], 1), round(b["seconds"], 1)]
        out[f"{name}_written"] = [a["written"], b["written"]]
        out[f"{name}_marginal_clips_per_s"] = round((b["written"] - a["written"]) / max(b["seconds"] - a["seconds"],
                                                                                         1e-9), 2)
        out[f"{name}_quarantined"] = b["summary"]["quarantined"]
    out["http_over_local_marginal"] = round(out["http_marginal_clips_per_s"] / out["local_marginal_clips_per_s"], 3)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
