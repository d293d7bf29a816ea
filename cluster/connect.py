"""How every job entry point finds its Ray cluster (shared by preprocess, training and serving).

Order: the configured address, ``RAY_ADDRESS`` (set by ``ray job submit``), the cluster that the last
``ray start`` on this machine recorded *if it still answers*, else a new local cluster.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def reachable(address: str, timeout_s: float = 2.0) -> bool:
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
    return recorded if recorded and reachable(recorded) else "local"


def init_ray(configured: str | None, **kwargs) -> str:
    """``ray.init`` on :func:`cluster_address` with the repo on the workers' PYTHONPATH; returns the address."""
    import ray

    runtime_env = kwargs.pop("runtime_env", {})
    address = cluster_address(configured)
    extra = {"include_dashboard": False} if address == "local" else {}
    ray.init(address=address, runtime_env=runtime_env, log_to_driver=kwargs.pop("log_to_driver", True), **extra, **kwargs)
    return address

