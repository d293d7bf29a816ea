"""SIGKILL a job or one of its workers mid-run: the shared part of the worker-failure and crash tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from helpers.ray_cluster import REPO, subprocess_env


def run_killing_worker(cmd: list[str], order_log: Path, step: int, *, ready: Callable[[], bool] = lambda: True,
                       timeout_s: float = 800) -> tuple[str, int | None]:
    """Run ``cmd`` (a ``training/run.py`` command with ``data.log_order``); once ``order_log`` (a rank's
    ``data_order`` log) shows it trained ``step`` and ``ready()`` holds, SIGKILL that worker's process.

    Asserts the job exits 0 (Ray Train restarts the worker group); returns (its output, the killed pid or None
    when the run finished first). The job is killed if the test fails or times out."""
    proc = subprocess.Popen(cmd, env=subprocess_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    killed = None
    try:
        deadline = time.monotonic() + timeout_s
        while killed is None and time.monotonic() < deadline and proc.poll() is None:
            if order_log.is_file() and ready():
                records = [json.loads(x) for x in order_log.read_text().splitlines()]
                if records and records[-1]["step"] >= step:
                    killed = records[-1]["pid"]
                    os.kill(killed, signal.SIGKILL)
            time.sleep(0.2)
        assert proc.wait(timeout=timeout_s) == 0, "".join(out)[-5000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(10)
    return "".join(out), killed


def kill_job_when(cmd: list[str], ready, timeout_s: float = 120) -> tuple[bool, str]:
    """Run the job; SIGKILL it once ``ready(stderr so far)`` holds. (killed mid-run, its stderr)."""
    proc = subprocess.Popen(cmd, env=subprocess_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and proc.poll() is None and not ready("".join(err)):
            time.sleep(0.05)
        killed = proc.poll() is None
    finally:
        proc.kill()
        proc.wait(30)
        reader.join(10)
    return killed, "".join(err)


def write_task_pids() -> list[int]:
    """Ray worker processes running a ``write_shard`` task now (their title: ``ray::MapBatches(write_shard)``)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"write_shard" in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids
