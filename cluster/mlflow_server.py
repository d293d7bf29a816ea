"""A local MLflow tracking server (``mlflow server``, sqlite backend, proxied artifacts), as the main job
(``cluster/main_job.py``) and the tests start it.

    proc, uri = start_mlflow_server(workdir)        # "http://127.0.0.1:<free port>", healthy
    ...
    stop_mlflow_server(proc)

    proc, uri = launch_mlflow_server(workdir)       # the same in two halves: other work meanwhile,
    wait_mlflow_server(proc, uri)                   # then wait for /health

    with running_mlflow_server(workdir) as uri:     # the same, stopped on exit (even on error)
        ...

Backend store ``sqlite:///<workdir>/mlflow.db``; artifacts are proxied by the server into
``<workdir>/artifacts`` (``--artifacts-destination``), so clients need no access to that folder; the server
log is ``<workdir>/mlflow-server.log``. The server runs in its own process group, which
:func:`stop_mlflow_server` terminates (the server and its uvicorn workers), nothing else.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

LOG_NAME = "mlflow-server.log"  # in the server's workdir


def free_port() -> int:
    """A TCP port that is free on the loopback interface now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_mlflow_server(workdir: str | Path, *, port: int | None = None, artifacts: str | None = None,
                         s3_endpoint: str | None = None) -> tuple[subprocess.Popen, str]:
    """Start ``mlflow server`` on ``port`` (default: a free loopback port) without waiting for it.

    ``artifacts``: where the server puts the artifacts it proxies (default ``<workdir>/artifacts``; an
    ``s3://bucket/prefix`` with ``s3_endpoint`` for MinIO/moto). Returns the process and the server's http
    URI; :func:`wait_mlflow_server` waits until it is healthy (the main job starts the Ray cluster meanwhile).
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    cmd = [sys.executable, "-m", "mlflow", "server",
           "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
           "--artifacts-destination", artifacts or str(workdir / "artifacts"),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    # No MLflow server jobs: nothing here submits any, and their job runner + huey consumers are eight
    # extra processes (~250 MB and a few CPU-seconds each at start) on every server.
    env = {**os.environ, "MLFLOW_TRACKING_URI": "", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           **({"MLFLOW_S3_ENDPOINT_URL": s3_endpoint} if s3_endpoint else {})}
    with (workdir / LOG_NAME).open("w") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def wait_mlflow_server(proc: subprocess.Popen, uri: str, timeout_s: float = 120.0) -> None:
    """Wait for the server's ``/health``. Raises (after stopping the process) when the server exits or is
    not healthy within ``timeout_s``; the log's path is in the message."""
    log_path = Path(proc.args[proc.args.index("--backend-store-uri") + 1].removeprefix("sqlite:///")).parent / LOG_NAME
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}; see {log_path}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"mlflow server not healthy after {timeout_s:.0f} s; see {log_path}")
            time.sleep(0.5)
    except BaseException:
        stop_mlflow_server(proc)
        raise


def start_mlflow_server(workdir: str | Path, *, port: int | None = None,
                        timeout_s: float = 120.0) -> tuple[subprocess.Popen, str]:
    """:func:`launch_mlflow_server` + :func:`wait_mlflow_server`: returns a healthy server and its URI."""
    proc, uri = launch_mlflow_server(workdir, port=port)
    wait_mlflow_server(proc, uri, timeout_s)
    return proc, uri


def stop_mlflow_server(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL it if still there after 15 s."""
    stop_process_group(proc)


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group a server was started in (``start_new_session``), SIGKILL it after 15 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@contextlib.contextmanager
def running_mlflow_server(workdir: str | Path, timeout_s: float = 120.0) -> Iterator[str]:
    """:func:`start_mlflow_server` for a ``with`` block: yields the URI, stops the server on exit."""
    proc, uri = start_mlflow_server(workdir, timeout_s=timeout_s)
    try:
        yield uri
    finally:
        stop_mlflow_server(proc)
