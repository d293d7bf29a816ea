"""Entry point: ``python pipelines/preprocess.py --config pipelines/configs/tiny.yaml --output=DIR ...``.

Connects to a running Ray cluster (``ray_address``, ``RAY_ADDRESS``, or the last ``ray start`` on
this machine when it is still reachable) and starts a local one when none runs; the work itself is :func:`pipelines.job.run`. Exits 0 on success,
2 on a configuration or manifest error (printed as one line, before Ray is touched).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python pipelines/preprocess.py` puts pipelines/, not the repo, on the path
    sys.path.insert(0, str(REPO))


def _reachable(address: str, timeout_s: float = 2.0) -> bool:
    """Whether ``host:port`` accepts a TCP connection (a GCS is listening)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def cluster_address(configured: str | None) -> str:
    """The Ray address to use: the configured one, ``RAY_ADDRESS``, a live local cluster, else "local".

    ``address="auto"`` alone retries for minutes when ``/tmp/ray/ray_current_cluster`` is left over
    from a cluster that is gone, so the recorded address is probed first.
    """
    if configured:
        return configured
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    try:
        from ray._private.services import (
            find_bootstrap_address,  # no public API for this lookup
        )

        recorded = find_bootstrap_address(None)
    except Exception:  # noqa: BLE001 - private API moved: behave as if no cluster runs
        recorded = None
    return recorded if recorded and _reachable(recorded) else "local"


def main(argv: list[str] | None = None) -> int:
    import ray

    from fdreamer.config import ConfigError, parse_cli
    from fdreamer.data import storage
    from fdreamer.data.manifests import ManifestError, read_manifests
    from pipelines.config import PreprocessConfig
    from pipelines.job import run

    try:
        cfg, _ = parse_cli(PreprocessConfig, sys.argv[1:] if argv is None else argv, prog="preprocess.py")
        cfg.check_ready()
        storage.resolve(cfg.output, cfg.s3_endpoint)  # unknown output scheme: fail fast
        records = read_manifests(cfg.inputs, cfg.s3_endpoint)  # before any Ray work: fail fast
    except (ConfigError, ManifestError, ValueError) as exc:
        print(f"preprocess: {exc}", file=sys.stderr)
        return 2
    # Workers import fdreamer/pipelines from the repo: put it on their path too.
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    runtime_env = {"env_vars": {"PYTHONPATH": pythonpath}}
    address = cluster_address(cfg.ray_address)
    extra = {"include_dashboard": False} if address == "local" else {}
    ray.init(address=address, runtime_env=runtime_env, log_to_driver=False, **extra)
    try:
        run(cfg, records)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
