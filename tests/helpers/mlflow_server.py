"""A real MLflow tracking server for tests (``python -m mlflow server``), killed with its process group.

    with running_mlflow_server(tmp_path) as uri:   # "http://127.0.0.1:<port>"
        mlflow.set_tracking_uri(uri)

Backend store: ``sqlite:///<workdir>/mlflow.db``; artifacts are proxied by the server into
``<workdir>/artifacts`` (``--artifacts-destination``), so clients need no access to that folder.
The server log is ``<workdir>/mlflow-server.log``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from .ray_cluster import free_port


@contextlib.contextmanager
def running_mlflow_server(workdir: Path, timeout_s: float = 120.0) -> Iterator[str]:
    """Start ``mlflow server`` on a free loopback port, wait for ``/health``, yield its http URI."""
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = (workdir / "mlflow-server.log").open("w")
    cmd = [sys.executable, "-m", "mlflow", "server",
           "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
           "--artifacts-destination", str(workdir / "artifacts"),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": ""}
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}; see {log.name}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"mlflow server not healthy after {timeout_s} s; see {log.name}")
            time.sleep(0.5)
        yield uri
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn/gunicorn workers
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()
