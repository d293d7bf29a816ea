"""Benchmark of the preprocessing job on the sample data. Not a test; prints ONE JSON line.

    python tests/bench/bench_preprocess.py [--clips 48] [--rss-clips 100 400] [--workdir DIR] [--quick]
    python tests/bench/bench_preprocess.py --marginal 160 640 [--encoders 2]   # marginal clips/s, plain loop vs Ray at 2 CPUs (tiny.yaml as shipped)

1. **Throughput** on the same ``--clips`` sample clips (generic manifest, tiny profile, tiny models
   with the trained VAE): a plain single-process loop calling the same stage functions
   (``hash_videos`` -> ``plan_pass2`` (dedup) -> ``decode_clips`` (+ flow) -> ``EncodeClips``
   -> ``write_shard``, one torch thread), then the Ray Data pipeline (``pipelines.job.run``) in a
   fresh ``ray.init(num_cpus=1)`` and a fresh ``ray.init(num_cpus=2)``. clips/s = clips written /
   wall seconds of the whole job (model loading included in both).
2. **Peak memory** of a fresh ``ray.init(num_cpus=2)`` run at each ``--rss-clips`` size: the sum of
   the RSS of the driver and every process below it (GCS, raylet, Ray workers), sampled every 0.2 s
   with psutil (else /proc), and of the ``ray::`` worker processes alone. Streaming keeps the peak
   flat in the number of clips (only pass 1's ~100-byte hash rows grow with it).

Stage resources for the Ray runs at N CPUs: decode (+ flow) ``concurrency=N`` and every stage
``num_cpus=0.5`` (so the encoder actor does not pin a whole CPU of a 1-CPU cluster).
``--quick``: 16 clips for throughput, 16 vs 64 for memory.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Self

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


# ------------------------------------------------------------------------------------------ memory
def _rss_by_pid() -> dict[int, tuple[str, int]]:
    """{pid: (name, rss bytes)} of this process and all its descendants."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        me = psutil.Process()
        out = {}
        for p in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                out[p.pid] = (" ".join(p.cmdline()[:1]) or p.name(), p.memory_info().rss)
        return out
    # /proc fallback: walk the parent links of every process.
    parents: dict[int, int] = {}
    info: dict[int, tuple[str, int]] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (d / "stat").read_text()
            parents[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            info[int(d.name)] = (cmd, int((d / "statm").read_text().split()[1]) * page)
    keep = {os.getpid()}
    changed = True
    while changed:
        new = {pid for pid, ppid in parents.items() if ppid in keep} - keep
        keep |= new
        changed = bool(new)
    return {pid: info[pid] for pid in keep if pid in info}


class PeakRSS:
    """Samples the summed RSS of this process tree in a thread; ``peak`` / ``peak_workers`` in bytes."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s, self.peak, self.peak_workers = interval_s, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            procs = _rss_by_pid()
            self.peak = max(self.peak, sum(r for _, r in procs.values()))
            self.peak_workers = max(self.peak_workers, sum(r for n, r in procs.values() if n.startswith("ray::")))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# -------------------------------------------------------------------------------------------- runs
def _config(manifest: Path, models: Path, out: Path, num_cpus: int, encoders: int | None = 1,
            overrides: tuple[str, ...] = (), shipped: bool = False) -> object:
    """The tiny profile for a run at ``num_cpus``: as shipped (``shipped``: the stage resources of tiny.yaml,
    which size themselves from the cluster), or with every stage at ``num_cpus`` tasks of 0.5 CPU and
    ``encoders`` actors (so the encoder actor does not pin a whole CPU of a 1-CPU cluster); then ``overrides``."""
    from fdreamer.config import load_config
    from pipelines.config import PreprocessConfig

    stages = [] if shipped else [
        f"--stages.hash.concurrency={num_cpus}", f"--stages.decode.concurrency={num_cpus}", "--stages.decode.num_cpus=0.5",
        "--stages.encode.num_cpus=0.5", f"--stages.encode.concurrency={encoders or 1}"]
    return load_config(PreprocessConfig, REPO / "pipelines/configs/tiny.yaml", [
        f"--inputs=[{manifest}]", f"--output={out}", f"--models_dir={models}", *stages, *overrides])


def plain_loop(cfg: object, batch: int = 8) -> dict:
    """The job's stage functions called in order in this process (no Ray): returns counts + seconds."""
    import dataclasses

    import pyarrow as pa

    from fdreamer.data.manifests import read_manifests
    from pipelines import job, stages
    from pipelines.plan import plan_pass2

    started = time.perf_counter()
    profile = cfg.profile.stage_dict()
    latent = cfg.profile.size // job._vae_factor(cfg)
    flow_size = (latent, latent)
    records = [dict(r) for r in read_manifests(cfg.inputs)]
    rows = []
    for i in range(0, len(records), batch):
        rows += stages.hash_videos(pa.Table.from_pylist(records[i:i + batch]), profile).to_pylist()
    todo = plan_pass2(rows, set(), cfg.dedup_threshold, cfg.dedup_bands).todo
    encode = stages.EncodeClips(dataclasses.asdict(cfg.resolved_encoders()))
    written = 0
    for i in range(0, len(todo), batch):
        t = encode(stages.decode_clips(pa.Table.from_pylist(todo[i:i + batch]), profile, flow_size=flow_size))
        res = stages.write_shard(t, cfg.output)
        written += sum(s == stages.OK for s in res.column("status").to_pylist())
    return {"written": written, "seconds": time.perf_counter() - started}


def ray_run(cfg: object, num_cpus: int, measure_rss: bool = False) -> dict:
    """``pipelines.job.run`` in a fresh local Ray with ``num_cpus`` CPUs."""
    import ray

    from pipelines.job import run

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}})
    try:
        with PeakRSS() if measure_rss else contextlib.nullcontext() as mem:
            started = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                summary = run(cfg)
            seconds = time.perf_counter() - started
    finally:
        ray.shutdown()
    out = {"written": summary["written"], "seconds": seconds, "summary": summary}
    if mem is not None:
        out |= {"peak_rss_mb": round(mem.peak / 2**20, 1), "peak_workers_rss_mb": round(mem.peak_workers / 2**20, 1)}
    return out


def marginal(root: Path, sizes: list[int], models: Path, encoders: int | None = None,
             overrides: tuple[str, ...] = ()) -> dict:
    """Marginal throughput, clips/s between two sizes (start-up and model loading cancel): the plain loop and
    the Ray job at 2 CPUs, each run at both sizes on the first ``n`` sample clips. The Ray run uses tiny.yaml as
    shipped (its stages sized from the cluster) unless ``encoders`` is given (then every stage as :func:`_config`
    sets it), plus ``overrides``."""
    lines = (root / "sample" / "manifest.jsonl").read_text().splitlines()
    runs: dict[str, dict[int, dict]] = {"plain": {}, "ray2": {}}
    warm = root / "manifest-warmup.jsonl"  # the loop's first call pays imports and first-use costs: not per clip
    warm.write_text("".join(line + "\n" for line in lines[:16]))
    plain_loop(_config(warm, models, root / "out-mplain-warmup", 1))
    for n in sizes:
        manifest = root / f"manifest-m{n}.jsonl"
        manifest.write_text("".join(line + "\n" for line in lines[:n]))
        runs["plain"][n] = plain_loop(_config(manifest, models, root / f"out-mplain-{n}", 1))
        runs["ray2"][n] = ray_run(_config(manifest, models, root / f"out-mray2-{n}", 2, encoders, overrides,
                                          shipped=encoders is None), 2)
    small, large = sizes
    out: dict = {"bench": "preprocess_marginal", "profile": "tiny", "sizes": sizes, "cpu_count": os.cpu_count(),
                 "ray2_config": "tiny.yaml as shipped" if encoders is None else f"every stage at 2 tasks, {encoders} "
                                                                                   "encoder actor(s)",
                 "ray2_overrides": list(overrides)}
    for name, by_size in runs.items():
        a, b = by_size[small], by_size[large]
        out[f"{name}_seconds"] = [round(a["seconds"], 1), round(b["seconds"], 1)]
        out[f"{name}_written"] = [a["written"], b["written"]]
        out[f"{name}_marginal_clips_per_s"] = round((b["written"] - a["written"]) / max(b["seconds"] - a["seconds"], 1e-9), 2)
    out["ray2_over_plain_marginal"] = round(out["ray2_marginal_clips_per_s"] / out["plain_marginal_clips_per_s"], 3)
    big = runs["ray2"][large]["summary"]  # where the Ray run's time goes at the larger size
    out["ray2_large"] = {"pass1_s": big["pass1_s"], "pass2_s": big["pass2_s"], "seconds": big["seconds"],
                         "worker_ms_per_clip": {k: round(1000 * v["worker_s"] / max(big["written"], 1), 1)
                                                for k, v in big["stages"].items()}}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=48, help="clips for the throughput comparison")
    p.add_argument("--marginal", type=int, nargs=2, default=None, metavar=("N1", "N2"),
                   help="only the marginal throughput between N1 and N2 clips (plain loop vs Ray at 2 CPUs)")
    p.add_argument("--rss-clips", type=int, nargs=2, default=[100, 400], help="two sizes for peak memory")
    p.add_argument("--encoders", type=int, default=None,
                   help="encoder actors of the Ray run of --marginal, with every stage at 2 tasks of 0.5 CPU (default: "
                        "tiny.yaml's stages as shipped)")
    p.add_argument("--ray-set", action="append", default=[], metavar="--KEY=VALUE",
                   help="a config override of the Ray run of --marginal, repeatable (--ray-set=--stages.encode.num_cpus=1)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--quick", action="store_true", help="16 clips; memory at 16 vs 64")
    args = p.parse_args()
    if args.quick:
        args.clips, args.rss_clips = 16, [16, 64]

    import torch

    from fdreamer.toy.sample_data import write_sample_data
    from fdreamer.toy.tiny_models import make_tiny_models

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
        root = Path(args.workdir or tmp)
        n_max = max(*args.marginal) if args.marginal else max(args.clips, *args.rss_clips)
        write_sample_data(root / "sample", n_max, workers=1)
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            make_tiny_models(root / "models", seed=0)
        if args.marginal:
            print(json.dumps(marginal(root, sorted(args.marginal), root / "models", args.encoders,
                                      tuple(args.ray_set))))
            return 0
        lines = (root / "sample" / "manifest.jsonl").read_text().splitlines()
        manifests = {}
        for n in {args.clips, *args.rss_clips}:
            manifests[n] = root / f"manifest-{n}.jsonl"
            manifests[n].write_text("".join(line + "\n" for line in lines[:n]))
        stamp = int(time.time())

        def cfg(n: int, tag: str, cpus: int) -> object:
            return _config(manifests[n], root / "models", root / f"out-{tag}-{stamp}", cpus)

        plain = plain_loop(cfg(args.clips, "plain", 1))
        ray1 = ray_run(cfg(args.clips, "ray1", 1), 1)
        ray2 = ray_run(cfg(args.clips, "ray2", 2), 2)
        mem = {n: ray_run(cfg(n, f"rss{n}", 2), 2, measure_rss=True) for n in args.rss_clips}
    small, large = args.rss_clips
    row = {
        "bench": "preprocess", "profile": "tiny", "clips": args.clips, "written": ray2["written"],
        "plain_loop_clips_per_s": round(plain["written"] / plain["seconds"], 2),
        "ray_1cpu_clips_per_s": round(ray1["written"] / ray1["seconds"], 2),
        "ray_2cpu_clips_per_s": round(ray2["written"] / ray2["seconds"], 2),
        "ray_2cpu_stage_clips_per_worker_s": {k: v["clips_per_worker_s"] for k, v in ray2["summary"]["stages"].items()},
        f"peak_rss_mb_{small}": mem[small]["peak_rss_mb"], f"peak_rss_mb_{large}": mem[large]["peak_rss_mb"],
        f"peak_workers_rss_mb_{small}": mem[small]["peak_workers_rss_mb"],
        f"peak_workers_rss_mb_{large}": mem[large]["peak_workers_rss_mb"],
        "rss_ratio": round(mem[large]["peak_rss_mb"] / max(mem[small]["peak_rss_mb"], 1e-9), 3),
        "bytes_per_clip": round(sum(ray2["summary"]["bytes_per_clip_by_column"].values()), 1),
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
