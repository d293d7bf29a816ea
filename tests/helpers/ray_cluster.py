"""A real local Ray head for tests: ``ray start --head --block`` on free ports, stopped on exit.

    with running_ray_head(tmp_path) as head:
        subprocess.run([..., f"--ray_address={head['address']}"], env=subprocess_env())

Only what this helper started is stopped (the ``ray start --block`` process and its session group),
so another Ray cluster on the machine is never touched; ``/tmp/ray/ray_current_cluster`` is put
back as it was, so a later bare ``ray.init()`` does not try to join the dead head.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CURRENT_CLUSTER = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
from cluster.mlflow_server import free_port  # noqa: E402  (re-exported for the tests)

RAY_BIN = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for Ray heads, drivers and jobs started by tests.

    The repo on ``PYTHONPATH``, one OpenMP thread, no usage stats, no token auth (``ray start``
    enables it by default; test-only clusters on loopback) and dummy AWS credentials for moto S3
    servers (the head passes its environment on to its workers).
    """
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": pythonpath, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
            "RAY_AUTH_MODE": "disabled", "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", **extra}


@contextlib.contextmanager
def running_ray_head(workdir: Path, num_cpus: int = 2, timeout_s: float = 60.0) -> Iterator[dict[str, str]]:
    """Start a Ray head with ``num_cpus`` CPUs, no GPUs and the job-submission dashboard.

    Yields ``{"address": "127.0.0.1:<gcs port>", "dashboard": "http://127.0.0.1:<port>"}``; the head's
    log is ``workdir/head.log``.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    port, dash = free_port(), free_port()
    # Every fixed default port on free ones too: another Ray cluster on the machine (other test
    # sessions) holds the defaults (e.g. the agent's 52365), and a head whose dashboard agent cannot
    # bind answers `ray job submit` with "No available agent to submit job".
    fixed = {flag: free_port() for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                            "metrics-export-port", "runtime-env-agent-port",
                                            "ray-client-server-port", "node-manager-port", "object-manager-port")}
    previous = CURRENT_CLUSTER.read_text() if CURRENT_CLUSTER.is_file() else None
    # Its own Ray temp dir (short: it holds Unix sockets): `ray job submit` drivers are pointed at the
    # cluster recorded in the head's temp dir, and with the shared /tmp/ray that is whichever cluster on
    # the machine ran `ray start` last — another test session's, which may stop mid-job.
    temp_dir = tempfile.mkdtemp(prefix="fdray-", dir="/tmp")
    log = (workdir / "head.log").open("w")
    head = subprocess.Popen(
        [RAY_BIN, "start", "--head", "--block", f"--port={port}", f"--num-cpus={num_cpus}", "--num-gpus=0",
         f"--temp-dir={temp_dir}",
         "--disable-usage-stats", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", *(f"--{flag}={p}" for flag, p in fixed.items())],
        # the head's workers fetch S3 checkpoints into the head's own cache folder, removed with it
        env=subprocess_env(RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0", FDREAMER_CACHE=str(workdir / "cache")),
        stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if head.poll() is not None:
                raise RuntimeError(f"ray start exited with {head.returncode}; see {log.name}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Ray head did not open port {port} in {timeout_s} s; see {log.name}")
            time.sleep(0.5)
        time.sleep(2.0)  # GCS port open; give the raylet a moment to register
        yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}"}
    finally:
        head.terminate()  # `ray start --block` stops its own processes on SIGTERM
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, 9)  # its own session: only what it started
            head.wait(10)
        log.close()
        # `ray start` recorded this (now dead) head as the machine's current cluster: put back what
        # was recorded before.
        if CURRENT_CLUSTER.is_file() and CURRENT_CLUSTER.read_text().strip().endswith(f":{port}"):
            if previous is None:
                CURRENT_CLUSTER.unlink()
            else:
                CURRENT_CLUSTER.write_text(previous)
        shutil.rmtree(temp_dir, ignore_errors=True)
