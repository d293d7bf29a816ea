"""Entry point: ``python training/run.py --config training/configs/tiny_stage1.yaml [--key=value ...] [--resume]``.

Connects to the Ray cluster (``ray job submit`` sets RAY_ADDRESS; standalone it joins a running local
cluster or starts one) and runs one training stage (:func:`training.launch.fit`). Exits 2 on a
configuration / data / checkpoint error, printed as one line before any worker starts. Those are caught by
their own classes (:func:`domain_errors`), not as ``ValueError``: any other exception is a bug and keeps its
traceback (exit 1).
"""

from __future__ import annotations

import sys


def domain_errors() -> tuple[type[BaseException], ...]:
    """The errors a user fixes (a config key, the data, a checkpoint, a run folder that exists): one line,
    exit 2. ``CheckpointIncomplete`` and ``DeviceConfigError`` are subclasses of the ones named here."""
    from fdreamer.checkpoint import CheckpointError
    from fdreamer.config import ConfigError
    from fdreamer.device import DeviceConfigError
    from training.rows import DataError

    return (ConfigError, DataError, CheckpointError, DeviceConfigError, FileExistsError)


def main(argv: list[str] | None = None) -> int:
    import ray

    from cluster.connect import init_ray
    from fdreamer.config import parse_cli
    from training.config import TrainConfig
    from training.launch import fit, prepare

    args = ["--resume=true" if a == "--resume" else a for a in (sys.argv[1:] if argv is None else argv)]
    try:
        cfg, _ = parse_cli(TrainConfig, args, prog="training/run.py")
        loop_config = prepare(cfg)  # every check before Ray starts workers
    except domain_errors() as exc:
        print(f"training: {exc}", file=sys.stderr)
        return 2
    init_ray(cfg.ray_address)
    try:
        fit(cfg, loop_config)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
