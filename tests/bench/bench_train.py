"""Benchmark: overhead of the Ray Train loop over a bare PyTorch loop. Not a test; prints ONE JSON line.

    python tests/bench/bench_train.py [--steps 20] [--quick] [--data DIR]

1. ``bare``: one process, the tiny model, ``fdreamer.train.step.optimizer_step`` on micro-batches already
   in memory (same shapes as the tiny stage: micro-batch 2 x 8 frames x 16x16 latents, accumulation 2).
2. ``ray_train``: the same function and in-memory batches inside a 1-worker ``TorchTrainer`` on a local
   Ray (what Ray Train itself adds: worker process, report/barrier every ``--report-every`` steps).
3. ``job``: the real job (``training.launch.fit``, tiny_stage1, 2 workers, Ray Data streaming from the
   preprocessed sample) for ``--steps`` steps; its data-wait fraction and samples/s come back from MLflow.

Ratios are against the bare loop measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def _batches(seed: int = 0, n: int = 2):
    import torch

    from fdreamer.data.batching import TrainBatch
    from fdreamer.models.conditions import Conditions

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        cond = Conditions(torch.randn(2, 77, 32, generator=g), torch.randn(2, 32, generator=g),
                          torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 12, 64, generator=g),
                          torch.ones(2, 12, dtype=torch.bool))
        out.append(TrainBatch(torch.randn(2, 4, 8, 16, 16, generator=g), cond, None, ["x", "y"]))
    return out


def _step_times(steps: int, report_every: int = 0) -> list[float]:
    """Seconds per optimizer step of the tiny model on in-memory batches (inside or outside Ray)."""
    import torch

    from fdreamer.models import FactorizedDreamerUNet, ModelConfig
    from fdreamer.schedule import NoiseSchedule, ScheduleConfig
    from fdreamer.train.step import make_optimizer, optimizer_step

    torch.set_num_threads(1)
    model = FactorizedDreamerUNet.from_preset("tiny", ModelConfig.tiny(), seed=0)
    opt = make_optimizer(model, 1e-3, 0.01, (0.9, 0.999), 1e-8)
    sched = NoiseSchedule(ScheduleConfig(num_frames=8, height=64, width=64, shift_scale=0.5))
    batches = _batches()
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        optimizer_step(model, opt, sched, batches, null=None, drop_probs=(0, 0, 0), gamma=1.0, grad_clip=1.0,
                       seed=0, rank=0, step=step)
        if report_every and (step + 1) % report_every == 0:
            import ray.train

            ray.train.report({"step": step + 1})
        times.append(time.perf_counter() - t0)
    return times


def _ray_loop(config: dict) -> None:
    import ray.train

    times = _step_times(config["steps"], config["report_every"])
    if ray.train.get_context().get_world_rank() == 0:  # Result.metrics of Train V2 needs a checkpoint: use a file
        Path(config["out"]).write_text(json.dumps(times))
    ray.train.report({"done": 1})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--report-every", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="8 steps, skip nothing")
    p.add_argument("--data", default=None, help="preprocessed sample (else one is made with 32 clips)")
    args = p.parse_args()
    steps = 8 if args.quick else args.steps
    warnings.filterwarnings("ignore")
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    bare = _step_times(steps)
    with tempfile.TemporaryDirectory() as tmp:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}})
        try:
            trainer = TorchTrainer(_ray_loop, train_loop_config={"steps": steps, "report_every": args.report_every,
                                                      "out": str(Path(tmp) / "times.json")},
                                   scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                                   run_config=RunConfig(name="bench", storage_path=tmp))
            trainer.fit()
            in_ray = json.loads((Path(tmp) / "times.json").read_text())
            data = Path(args.data) if args.data else None
            if data is None:
                from helpers.datasets import preprocess_sample

                data = preprocess_sample(Path(tmp) / "data", ray.get_runtime_context().gcs_address)["output"]
                models = data.parent / "models"
            else:
                models = None
            job = _run_job(data, models, Path(tmp), steps)
        finally:
            ray.shutdown()
    skip = min(2, steps - 1)  # first steps include allocation warm-up
    b, r = statistics.median(bare[skip:]), statistics.median(in_ray[skip:])
    print(json.dumps({
        "steps": steps, "bare_step_s": round(b, 4), "ray_train_step_s": round(r, 4),
        "ray_train_overhead_ratio": round(r / b, 3), **job,
    }), flush=True)
    return 0


def _run_job(data: Path, models: Path | None, tmp: Path, steps: int) -> dict:
    import mlflow

    from fdreamer.config import load_config
    from training.config import TrainConfig
    from training.launch import fit

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    overrides = [f"--data.path={data}", f"--storage_path={tmp / 'runs'}", f"--steps={steps}",
                 f"--tracking.tracking_uri={uri}", "--tracking.sample_every=-1", f"--tracking.log_every={steps}",
                 f"--checkpoint.every={steps}", "--tracking.validate_every=0"]
    if models is not None:
        overrides.append(f"--models_dir={models}")
    cfg = load_config(TrainConfig, REPO / "training/configs/tiny_stage1.yaml", overrides)
    t0 = time.perf_counter()
    fit(cfg)
    wall = time.perf_counter() - t0
    client = mlflow.tracking.MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])[0]
    m = run.data.metrics
    return {"job_steps": steps, "job_wall_s": round(wall, 1), "job_samples_per_s": round(m.get("samples_per_s", 0), 3),
            "job_data_wait_fraction": round(m.get("data_wait_fraction", 0), 3),
            "job_global_batch": cfg.global_batch, "job_workers": cfg.scaling.num_workers}


if __name__ == "__main__":
    sys.exit(main())
