"""Entry point: ``python training/evaluate_job.py --checkpoint DIR|runs:/ID [--data DIR] [--concurrency 2] ...``.

``fdreamer evaluate`` on a Ray cluster: the prompt items go through
``ray.data.from_items(...).map_batches(GenerateAndScore, concurrency=k)``, actors that load the pipeline once;
scoring, the summary and MLflow logging are :func:`fdreamer.eval.evaluate.evaluate`'s. Same options as
``fdreamer evaluate`` plus where to run (:class:`EvalJobConfig`). Exits 2 on a bad option or checkpoint.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fdreamer.config import opt
from fdreamer.eval.evaluate import EvalConfig, EvalSettings, GenerateAndScore


@dataclass
class EvalJobConfig(EvalConfig):
    ray_address: str | None = opt(None, "Ray cluster (default: RAY_ADDRESS, a running local cluster, else a new one)")
    concurrency: int = opt(2, "GenerateAndScore actors")
    num_cpus: float = opt(1.0, "CPUs per actor (also its torch threads)")
    num_gpus: float = opt(0.0, "GPUs per actor (fractional shares one GPU); with --device auto the actors run on "
                          "CUDA exactly when this is > 0; --device cuda with 0 (or cpu with > 0) is refused")


def _to_rows(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The image column is ragged (None for T2V): ship each as bytes + a JSON shape; no motion prompt as ""."""
    return [{**{k: v for k, v in it.items() if k != "image"},
             "motion_prompt": it.get("motion_prompt") or "",  # a None column would arrive as NaN
             "image_bytes": b"" if it["image"] is None else np.ascontiguousarray(it["image"]).tobytes(),
             "image_shape": json.dumps(None if it["image"] is None else list(it["image"].shape))}
            for it in items]


def ray_runner(concurrency: int, num_cpus: float, s3_endpoint: str | None = None, *, num_gpus: float = 0.0,
               device: str = "cpu"):
    """A :data:`fdreamer.eval.evaluate.Runner` on Ray Data (ray must be initialised); each actor (``num_cpus``,
    ``num_gpus``) loads the checkpoint itself (an ``s3://`` one fetched into its node's cache) on ``device``
    (resolved on the driver from ``num_gpus``: Ray leaves a GPU-less actor every GPU of its node visible)."""
    import ray

    def run(checkpoint: str, items: list[dict[str, Any]], settings: EvalSettings) -> list[dict[str, Any]]:
        ds = ray.data.from_items(_to_rows(items)).map_batches(
            GenerateAndScore, fn_constructor_kwargs={"checkpoint": str(checkpoint), "settings": asdict(settings),
                                                     "torch_threads": max(1, int(num_cpus)), "s3_endpoint": s3_endpoint,
                                                     "device": device},
            batch_size=1, concurrency=concurrency, num_cpus=num_cpus, **({"num_gpus": num_gpus} if num_gpus else {}))
        outs = [{"row": json.loads(r["row_json"]), "frames": np.asarray(r["frames"])} for r in ds.iter_rows()]
        order = {it["id"]: i for i, it in enumerate(items)}
        return sorted(outs, key=lambda o: order[o["row"]["id"]])

    return run


def run(cfg: EvalJobConfig) -> int:
    import ray

    from cluster.connect import init_ray
    from fdreamer.checkpoint import resolve_checkpoint
    from fdreamer.cli.evaluate import report
    from fdreamer.device import device_for_gpus
    from fdreamer.eval.evaluate import domain_errors, evaluate_config

    try:  # fail before Ray starts
        device = device_for_gpus(cfg.device, cfg.num_gpus, "GenerateAndScore actors")
        resolve_checkpoint(cfg.checkpoint, cfg.tracking_uri, s3_endpoint=cfg.s3_endpoint)
    except domain_errors() as exc:  # by class (CheckpointError, DeviceConfigError, ...): a bug keeps its traceback
        print(f"evaluate_job: {exc}", file=sys.stderr)
        return 2
    init_ray(cfg.ray_address, log_to_driver=False)
    try:
        result = evaluate_config(cfg, runner=ray_runner(cfg.concurrency, cfg.num_cpus, cfg.s3_endpoint,
                                                        num_gpus=cfg.num_gpus, device=device))
    except domain_errors() as exc:
        print(f"evaluate_job: {exc}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()
    report(result)
    return 0


def main(argv: list[str] | None = None) -> int:
    from fdreamer.cli.config_command import run_command

    return run_command(EvalJobConfig, run, list(sys.argv[1:] if argv is None else argv), prog="training/evaluate_job.py")


if __name__ == "__main__":
    sys.exit(main())
