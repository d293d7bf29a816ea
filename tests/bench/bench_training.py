"""Benchmark: the training job on the streaming path against a bare PyTorch loop. Not a test; prints ONE JSON line.

    python tests/bench/bench_training.py [--steps 24] [--data PREPROCESSED --models MODELS]

1. ``bare``: two processes (``torch.multiprocessing``, DDP over gloo, one thread each as Ray gives a 1-CPU
   worker), the stage's model (``training.loop.build_model``) and ``fdreamer.train.step.optimizer_step``
   with the stage's micro-batch and accumulation, and its EMA update, on batches read into memory beforehand from the same shards
   (each rank its own, through the job's own stream): the step with nothing around it.
2. ``job``: the real job (``training.launch.fit``, tiny_stage1, 2 workers) on the streaming path
   (``data.cache_blocks=0``: every row group read from the shards while training), logging every 2 steps, no
   validation / samples, one checkpoint at the end. From MLflow: per logging window, samples/s and the
   data-wait fraction (time in ``next_micro_batches`` over wall time); the first window (start-up) is left out.

``job_step_s / bare_step_s`` is the ratio that counts (goal <= 1.05), ``job_data_wait_fraction`` the data
wait (goal <= 0.05); both measured in the same run on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
CONFIG = REPO / "training" / "configs" / "tiny_stage1.yaml"


def _cfg(data: Path, models: Path, tmp: Path, steps: int):
    from fdreamer.config import load_config
    from training.config import TrainConfig

    return load_config(TrainConfig, CONFIG, [
        f"data.path={data}", f"models_dir={models}", f"storage_path={tmp / 'runs'}", f"steps={steps}",
        f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", "tracking.sample_every=-1", "tracking.log_every=2",
        f"checkpoint.every={steps}", "tracking.validate_every=0", "data.cache_blocks=0", "name=bench"])


def _bare_worker(rank: int, cfg, loop_config: dict, steps: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from fdreamer.data.batching import null_from_tensors
    from fdreamer.schedule import NoiseSchedule
    from fdreamer.train.step import EMA, make_optimizer, optimizer_step
    from training import data as train_data
    from training.loop import build_model
    from training.order import Blocks

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    stream = train_data.open_stream(cfg, "train", Blocks.from_dict(loop_config["blocks"]["train"]), rank=rank, world=2)
    batches = []
    while len(batches) < steps * cfg.accumulation:
        batch = stream.next()
        if batch is None:
            stream.start(stream.epoch + 1, 0)
            continue
        batches.append(batch)
    stream.close()
    plain = build_model(cfg, None).train()
    model = torch.nn.parallel.DistributedDataParallel(plain)
    o = cfg.optim
    ema = EMA(plain, o.ema_decay, o.ema_start) if o.ema_decay > 0 else None  # part of the step, as in the job
    optimizer = make_optimizer(model, o.lr, o.weight_decay, o.betas, o.eps)
    schedule = NoiseSchedule(cfg.schedule)
    null = null_from_tensors(train_data.load_null(cfg.data.path))
    obj = cfg.objective
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        optimizer_step(model, optimizer, schedule, batches[step * cfg.accumulation:(step + 1) * cfg.accumulation],
                       null=null, drop_probs=(obj.drop_text, obj.drop_image, obj.drop_both), gamma=obj.gamma,
                       grad_clip=o.grad_clip, seed=cfg.seed, rank=rank, step=step, no_sync=model.no_sync,
                       image_weight=obj.image_loss_weight, timestep_sampling=obj.timestep_sampling)
        if ema is not None:
            ema.update(plain, step + 1)
        times.append(time.perf_counter() - t0)
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def bare_step_times(cfg, loop_config: dict, steps: int, tmp: Path) -> list[float]:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp / "bare.json"
    mp.spawn(_bare_worker, args=(cfg, loop_config, steps, port, str(out)), nprocs=2, join=True)
    return json.loads(out.read_text())


def job_windows(cfg) -> dict:
    import mlflow

    from training.launch import fit

    t0 = time.perf_counter()
    fit(cfg)
    wall = time.perf_counter() - t0
    client = mlflow.tracking.MlflowClient(cfg.tracking.tracking_uri)
    run = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])[0]
    history = {k: [m.value for m in sorted(client.get_metric_history(run.info.run_id, k), key=lambda m: m.step)]
               for k in ("samples_per_s", "data_wait_fraction", "data/train_built_batches")}
    rates, waits = history["samples_per_s"][1:], history["data_wait_fraction"][1:]  # window 1: start-up
    return {"job_wall_s": round(wall, 1), "job_step_s": round(cfg.global_batch / statistics.median(rates), 4),
            "job_data_wait_fraction": round(statistics.median(waits), 4),
            "job_data_wait_fraction_max": round(max(waits), 4), "job_windows": len(rates),
            "job_built_batches_rank0": int(history["data/train_built_batches"][-1])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--data", default=None, help="preprocessed sample (else one is made with 32 clips)")
    p.add_argument("--models", default=None, help="the models folder the sample was preprocessed with")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # as the tests' clusters: the preprocessing subprocess joins it
    import ray

    from training.launch import prepare

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            if args.data is None:
                from helpers.datasets import preprocess_sample

                made = preprocess_sample(tmp / "data", ray.get_runtime_context().gcs_address)
                data, models = made["output"], made["models"]
            else:
                data, models = Path(args.data), Path(args.models)
            cfg = _cfg(data, models, tmp, args.steps)
            job = job_windows(cfg)
        finally:
            ray.shutdown()
        bare = bare_step_times(cfg, prepare(_cfg(data, models, tmp / "bare", args.steps)), args.steps, tmp)
    b = statistics.median(bare[2:])  # the first steps include allocation warm-up
    print(json.dumps({
        "steps": args.steps, "workers": cfg.scaling.num_workers, "global_batch": cfg.global_batch,
        "micro_batch": cfg.micro_batch, "bare_step_s": round(b, 4), **job,
        "job_vs_bare_step_ratio": round(job["job_step_s"] / b, 3),
        "goals": {"job_vs_bare_step_ratio": 1.05, "job_data_wait_fraction": 0.05},
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
