"""Benchmark: what serving adds over calling the pipeline directly. Not a test; prints ONE JSON line.

    python tests/bench/bench_serving.py [--quick] [--requests 16] [--concurrency 4]

Starts its own 2-CPU Ray head (free ports), writes tiny models and a tiny checkpoint to a temp dir and
deploys ``serving.app:build_app`` on it.

1. ``direct_s``: median seconds of ``VideoPipeline(request)`` in this process (text-to-video, 4 frames
   32x32, 2 steps, fixed seed; one torch thread like the replicas).
2. ``http_s``: median end-to-end seconds of the same request as ``POST /v1/videos?wait=true`` (ingress,
   T2I deployment, I2V deployment, mp4 encode, store) one at a time; ``overhead_ratio`` = http / direct.
3. ``throughput``: requests/s at ``--concurrency`` (different seeds, same shape) with ``@serve.batch``
   on (batching.enabled) and off (each request on its own thread), the app redeployed in between.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

REQUEST = {"prompt": "a red ball bounces", "num_frames": 4, "height": 32, "width": 32, "num_inference_steps": 2,
           "seed": 0}


def _checkpoint(tmp: Path) -> Path:
    from fdreamer.toy import tiny_models as tm
    from helpers.checkpoints import tiny_checkpoint, tiny_schedule

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tm.make_tiny_models(tmp / "models", seed=0, allow_untrained_vae=True, vae_asset_dir=tmp / "no-asset")
    return tiny_checkpoint(tmp / "ckpt", tmp / "models", schedule=tiny_schedule(prediction_type="v_prediction"))


def _direct(ckpt: Path, reps: int) -> float:
    import torch

    from fdreamer.inference.pipeline import VideoPipeline, VideoRequest

    torch.set_num_threads(1)
    pipe = VideoPipeline.from_checkpoint(ckpt)
    pipe(VideoRequest(**REQUEST))  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        pipe(VideoRequest(**REQUEST))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _post(url: str, body: dict) -> float:
    import requests

    t0 = time.perf_counter()
    r = requests.post(f"{url}/v1/videos", params={"wait": "true"}, json=body, timeout=300)
    if r.status_code != 200 or r.json().get("status") != "succeeded":
        raise RuntimeError(f"{r.status_code}: {r.text[:300]}")
    return time.perf_counter() - t0


def _deploy(ckpt: Path, store: Path, batching: bool, url: str) -> None:
    import requests
    from ray import serve

    from serving.app import bind_app

    serve.run(bind_app({"checkpoint": str(ckpt), "store": str(store), "batching": {"enabled": batching}},
                        actor_env={"OMP_NUM_THREADS": "1"}), name="bench", route_prefix="/")
    deadline = time.monotonic() + 120
    while requests.get(f"{url}/readyz", timeout=30).status_code != 200:
        if time.monotonic() > deadline:
            raise TimeoutError("app not ready")
        time.sleep(0.5)


def _throughput(url: str, n: int, concurrency: int) -> float:
    _post(url, REQUEST)  # warm-up
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        list(ex.map(lambda i: _post(url, {**REQUEST, "seed": i}), range(n)))
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions (about a minute)")
    p.add_argument("--requests", type=int, default=None, help="requests per throughput run (default 16, quick 8)")
    p.add_argument("--concurrency", type=int, default=4)
    args = p.parse_args(argv)
    reps = 3 if args.quick else 10
    n = args.requests or (8 if args.quick else 16)

    import ray
    from helpers.ray_cluster import free_port, running_ray_head
    from ray import serve

    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp_s:
        tmp = Path(tmp_s)
        ckpt = _checkpoint(tmp)
        direct = _direct(ckpt, reps)
        with running_ray_head(tmp / "head", num_cpus=2) as head:
            ray.init(address=head["address"], log_to_driver=False)
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            try:
                serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 300})
                _deploy(ckpt, tmp / "store", True, url)
                _post(url, REQUEST)  # warm-up
                http = statistics.median(_post(url, REQUEST) for _ in range(reps))
                batched = _throughput(url, n, args.concurrency)
                _deploy(ckpt, tmp / "store", False, url)
                unbatched = _throughput(url, n, args.concurrency)
            finally:
                serve.shutdown()
                ray.shutdown()
    print(json.dumps({
        "bench": "serving", "quick": args.quick, "request": REQUEST, "reps": reps,
        "direct_s": round(direct, 4), "http_s": round(http, 4), "overhead_ratio": round(http / direct, 3),
        "overhead_s": round(http - direct, 4), "concurrency": args.concurrency, "requests": n,
        "throughput_batched_rps": round(batched, 3), "throughput_unbatched_rps": round(unbatched, 3),
        "batching_speedup": round(batched / unbatched, 3),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
