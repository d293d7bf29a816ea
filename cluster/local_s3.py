"""A local S3 endpoint for ``cluster/main_job.py --storage s3``: moto's server mode on loopback.

On a real cluster the jobs read and write a bucket with the nodes' credentials; here the main job starts
``moto_server`` on a free port, creates the bucket :data:`BUCKET` and puts the sample clips and their
manifest there, so every job of the run reads and writes ``s3://`` exactly as on the cluster (with
``--s3_endpoint``; moto accepts the dummy :data:`CREDENTIALS`, exported before the Ray nodes start so
every worker inherits them). The server keeps the objects in memory: they are gone when it stops.

    proc, endpoint = launch_s3_server(workdir)   # "http://127.0.0.1:<port>"
    wait_s3_server(proc, endpoint)               # creates the bucket
    manifest = upload_sample(sample_dir, endpoint)   # s3://fdreamer/sample/manifest.jsonl
    stop_s3_server(proc)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from cluster.mlflow_server import free_port, stop_process_group

BUCKET = "fdreamer"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
LOG_NAME = "s3-server.log"


def moto_missing() -> str | None:
    """One line when moto's server is not installed (it comes with the ``dev`` extra), else None."""
    try:
        import moto.server  # noqa: F401
    except ImportError:
        return "--storage s3 starts a local S3 server (moto) for this run: pip install 'moto[server]' (make setup does)"
    return None


def launch_s3_server(workdir: Path) -> tuple[subprocess.Popen, str]:
    """Start ``moto_server`` on a free loopback port in its own process group, without waiting for it."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    with (workdir / LOG_NAME).open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                cwd=workdir, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def wait_s3_server(proc: subprocess.Popen, endpoint: str, timeout_s: float = 60.0) -> None:
    """Wait until the server answers, then create :data:`BUCKET`; raises (server stopped) on exit or timeout."""
    import boto3

    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                with urllib.request.urlopen(endpoint, timeout=2):
                    break
            except OSError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"the S3 server (moto) exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the S3 server (moto) did not answer at {endpoint} within {timeout_s:.0f} s")
            time.sleep(0.3)
        boto3.client("s3", endpoint_url=endpoint, region_name=CREDENTIALS["AWS_DEFAULT_REGION"]).create_bucket(
            Bucket=BUCKET)
    except BaseException:
        stop_s3_server(proc)
        raise


def stop_s3_server(proc: subprocess.Popen) -> None:
    stop_process_group(proc)


def upload_sample(sample: Path, endpoint: str, prefix: str = "sample") -> str:
    """The sample clips under ``s3://<BUCKET>/<prefix>/`` and their manifest with ``s3://`` paths; returns
    the manifest's URI."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name=CREDENTIALS["AWS_DEFAULT_REGION"])
    rows = []
    for line in (sample / "manifest.jsonl").read_text().splitlines():
        row = json.loads(line)
        clip = Path(row["path"])
        key = f"{prefix}/{clip.relative_to(sample).as_posix()}"
        client.upload_file(str(clip), BUCKET, key)
        rows.append(json.dumps({**row, "path": f"s3://{BUCKET}/{key}"}))
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/manifest.jsonl", Body=("\n".join(rows) + "\n").encode())
    return f"s3://{BUCKET}/{prefix}/manifest.jsonl"


def list_keys(endpoint: str, prefix: str) -> list[str]:
    """Every key of :data:`BUCKET` under ``prefix`` (what the run left in the bucket)."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name=CREDENTIALS["AWS_DEFAULT_REGION"])
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


__all__ = ["BUCKET", "CREDENTIALS", "launch_s3_server", "list_keys", "moto_missing", "stop_s3_server",
           "upload_sample", "wait_s3_server"]
