"""The README's main job end to end (issue 7): ``python cluster/main_job.py`` on a fresh local 2-node cluster.

Sample data -> MLflow server -> ``cluster/local.sh up`` -> ``ray job submit`` preprocessing ->
``ray job submit`` training (2 workers over both nodes) -> ``serve deploy`` -> one text-to-video request
over HTTP -> everything stopped. Checks the jobs SUCCEEDED through the Ray Jobs API (the script fails
otherwise), training placed workers on both nodes (MLflow tag), and the mp4.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from helpers.ray_cluster import REPO, free_port, subprocess_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1500)]


def test_main_job_end_to_end(tmp_path: Path) -> None:
    work = tmp_path / "main-job"
    env = subprocess_env(FDREAMER_DASHBOARD_PORT=str(free_port()), FDREAMER_CLUSTER_DIR=str(tmp_path / "c"))
    proc = subprocess.run([sys.executable, str(REPO / "cluster" / "main_job.py"), f"--workdir={work}", "--clips=24",
                           "--steps=6", "--keep-mlflow"], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=1400, check=False)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    stream = result["mp4_stream"]
    assert stream["codec_name"] == "h264" and int(stream["nb_read_frames"]) == 8
    assert (stream["width"], stream["height"]) == (64, 64)
    summary = json.loads(Path(result["parquet_summary"]).read_text())
    assert summary["written"] > 0
    try:
        run = mlflow.tracking.MlflowClient(result["mlflow_ui"]).get_run(result["mlflow_run_id"])
        assert run.data.tags["ray.num_nodes"] == "2", run.data.tags.get("ray.worker_nodes")
        assert "val_loss" in run.data.metrics
    finally:
        os.killpg(result["mlflow_pid"], signal.SIGTERM)  # the script's own MLflow server, kept for this check
    # the cluster is down: its state file says so and `status` exits non-zero
    status = subprocess.run([str(REPO / "cluster" / "local.sh"), "status"], env=env, cwd=REPO,
                            capture_output=True, text=True, check=False)
    assert status.returncode != 0
