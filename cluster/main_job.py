"""The main job, end to end on the local 2-node cluster: ``make main-job`` (or ``python cluster/main_job.py``).

Runs exactly what a user runs on a real cluster, on the sample data:

1. ``fdreamer sample-data`` + ``fdreamer make-tiny-models`` (inputs; skipped when present);
2. an MLflow server (sqlite backend) on a free port;
3. ``cluster/local.sh up`` (head + worker node);
4. ``ray job submit --working-dir . -- python pipelines/preprocess.py --config pipelines/configs/tiny.yaml ...``;
5. ``ray job submit --working-dir . -- python training/run.py --config training/configs/tiny_stage1.yaml ...``
   (2 workers spread over both nodes);
6. ``serve deploy`` of ``serving/config.yaml`` pointed at the trained checkpoint;
7. one text-to-video request through HTTP, the mp4 checked with ffprobe;

then prints where the mp4, the Parquet summary and the MLflow run are, and (unless ``--keep``) stops the
Serve app, the cluster and the MLflow server. Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

from cluster.mlflow_server import free_port, start_mlflow_server, stop_mlflow_server  # noqa: E402

RUNTIME_ENV = {"working_dir": ".", "excludes": [".git/", ".venv/", "runs/", "data/", "models/", "mlruns/",
                                                  "**/__pycache__/", "*.mp4", "*.parquet"]}


def step(msg: str) -> float:
    print(f"\n== {time.strftime('%H:%M:%S')} {msg}", flush=True)
    return time.monotonic()


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess:
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, cwd=REPO, **kw)


def env() -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def wait_http(url: str, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=3) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{what} did not answer at {url} within {timeout_s:.0f} s")


def wait_serve(base: str, dashboard: str, timeout_s: float) -> None:
    """Wait for the app's ``/readyz``; fail at once (with Serve's message) if the deploy failed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=3) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        try:
            with urllib.request.urlopen(f"{dashboard}/api/serve/applications/", timeout=10) as r:
                apps = json.loads(r.read()).get("applications", {})
        except OSError:
            apps = {}
        for name, app in apps.items():
            if app.get("status") == "DEPLOY_FAILED":
                raise RuntimeError(f"serve deploy of {name!r} failed:\n{app.get('message', '')}")
        time.sleep(2)
    raise TimeoutError(f"the Serve app did not answer at {base}/readyz within {timeout_s:.0f} s")


def submit(dashboard: str, entrypoint: list[str], timeout_s: float) -> str:
    """``ray job submit`` (streams the job's logs = its progress); returns the job id; fails unless SUCCEEDED."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    job_id = f"fdreamer-{entrypoint[1].split('/')[0]}-{int(time.time())}"
    run([BIN / "ray", "job", "submit", "--address", dashboard, "--submission-id", job_id,
         "--runtime-env-json", json.dumps(RUNTIME_ENV), "--", *entrypoint], env=env(), timeout=timeout_s)
    status = JobSubmissionClient(dashboard).get_job_status(job_id)
    if status != JobStatus.SUCCEEDED:
        raise RuntimeError(f"job {job_id} ended {status}")
    print(f"job {job_id}: {status}", flush=True)
    return job_id


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=str(REPO / "runs" / "main-job"), help="outputs (git-ignored)")
    p.add_argument("--clips", type=int, default=48)
    p.add_argument("--steps", type=int, default=20, help="training steps of tiny stage 1")
    p.add_argument("--keep", action="store_true", help="leave the cluster, the app and MLflow running")
    p.add_argument("--keep-mlflow", action="store_true", help="stop the cluster but leave MLflow running (pid printed)")
    args = p.parse_args(argv)
    # SIGTERM (a CI timeout, `kill`) unwinds through the finally below, so nothing is left running
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.monotonic()
    timings: dict[str, float] = {}
    os.environ.setdefault("FDREAMER_DASHBOARD_PORT", str(free_port()))
    os.environ.setdefault("FDREAMER_CLUSTER_DIR", str(work / "cluster"))
    os.environ.setdefault("FDREAMER_STORAGE_PATH", str(work / "storage"))
    mlflow_proc = None
    result: dict[str, Any] = {}
    try:
        t = step("1/7 sample data and tiny models")
        sample, models = work / "sample", work / "models"
        if not (sample / "_DONE.json").is_file():
            run([BIN / "fdreamer", "sample-data", sample, "--num-clips", args.clips])
        if not (models / "tiny_models.json").is_file():
            run([BIN / "fdreamer", "make-tiny-models", models])
        timings["inputs_s"] = time.monotonic() - t

        t = step("2/7 MLflow server (sqlite)")
        mlflow_proc, mlflow_uri = start_mlflow_server(work / "mlflow")
        timings["mlflow_s"] = time.monotonic() - t

        t = step("3/7 local 2-node Ray cluster")
        run([REPO / "cluster" / "local.sh", "up"], env=env())
        state = json.loads((Path(os.environ["FDREAMER_CLUSTER_DIR"]) / "cluster.json").read_text())
        dashboard = state["dashboard"]
        timings["cluster_s"] = time.monotonic() - t

        t = step("4/7 ray job submit: preprocessing (Ray Data)")
        pre = work / "preprocessed"
        shutil.rmtree(pre, ignore_errors=True)
        result["preprocess_job"] = submit(dashboard, [
            "python", "pipelines/preprocess.py", "--config", "pipelines/configs/tiny.yaml",
            f"--inputs=[{sample / 'manifest.jsonl'}]", f"--output={pre}", f"--models_dir={models}",
            f"--mlflow_tracking_uri={mlflow_uri}"], timeout_s=900)
        timings["preprocess_s"] = time.monotonic() - t

        t = step("5/7 ray job submit: training stage 1 (Ray Train, 2 workers)")
        storage = Path(os.environ["FDREAMER_STORAGE_PATH"])
        shutil.rmtree(storage / "main_tiny_stage1", ignore_errors=True)
        result["train_job"] = submit(dashboard, [
            "python", "training/run.py", "--config", "training/configs/tiny_stage1.yaml", f"--data.path={pre}",
            f"--models_dir={models}", f"--storage_path={storage}", "--name=main_tiny_stage1",
            f"--steps={args.steps}", f"--checkpoint.every={args.steps}", f"--tracking.tracking_uri={mlflow_uri}",
            "--tracking.experiment=main-job", "--scaling.placement_strategy=SPREAD"], timeout_s=1200)
        from training.checkpointing import latest_checkpoint, read_trainer_state

        ckpt = latest_checkpoint(storage / "main_tiny_stage1")
        run_id = read_trainer_state(ckpt).mlflow_run_id
        timings["train_s"] = time.monotonic() - t

        t = step("6/7 serve deploy of the checkpoint (Ray Serve)")
        import yaml

        http_port = free_port()
        cfg = yaml.safe_load((REPO / "serving" / "config.yaml").read_text())
        cfg["http_options"].update(host="127.0.0.1", port=http_port)
        app = cfg["applications"][0]
        app["args"].update(checkpoint=str(ckpt), store=str(work / "serving-jobs"))
        # serve deploy takes only remote working_dir URIs: on this machine the checkout is shared by both
        # nodes, so the replicas import it through PYTHONPATH (a real cluster bakes it into the image)
        serve_cfg = work / "serve.yaml"
        serve_cfg.write_text(yaml.safe_dump(cfg, sort_keys=False))
        run([BIN / "serve", "deploy", serve_cfg, "--address", dashboard], env=env(), timeout=300)
        base = f"http://127.0.0.1:{http_port}"
        wait_serve(base, dashboard, 300)
        timings["serve_s"] = time.monotonic() - t

        t = step("7/7 text-to-video over HTTP")
        body = json.dumps({"prompt": "a red circle moving to the right", "num_frames": 8, "height": 64, "width": 64,
                           "num_inference_steps": 10, "seed": 7}).encode()
        req = urllib.request.Request(f"{base}/v1/videos?wait=true", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            job = json.loads(r.read())
        with urllib.request.urlopen(f"{base}/v1/videos/{job['id']}/content", timeout=60) as r:
            mp4 = work / "t2v.mp4"
            mp4.write_bytes(r.read())
        probe = json.loads(subprocess.run(
            ["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
             "stream=codec_name,nb_read_frames,width,height", "-of", "json", str(mp4)],
            check=True, capture_output=True, text=True).stdout)["streams"][0]
        timings["request_s"] = time.monotonic() - t
        result.update({
            "mp4": str(mp4), "mp4_stream": probe, "parquet_summary": str(pre / "summary.json"),
            "checkpoint": str(ckpt), "mlflow_ui": mlflow_uri, "mlflow_run_id": run_id,
            "mlflow_run": f"{mlflow_uri}/#/experiments/{_experiment_id(mlflow_uri, run_id)}/runs/{run_id}",
            "dashboard": dashboard, "app": base,
        })
        print(f"\nvideo:            {mp4}  ({probe['nb_read_frames']} frames {probe['width']}x{probe['height']} "
              f"{probe['codec_name']})\nParquet summary:  {pre / 'summary.json'}\ncheckpoint:       {ckpt}\n"
              f"MLflow run:       {result['mlflow_run']}", flush=True)
    finally:
        if not args.keep:
            step("stopping the app, the cluster and MLflow")
            if "dashboard" in locals():
                subprocess.run([BIN / "serve", "shutdown", "--address", dashboard, "-y"], env=env(), check=False,
                               cwd=REPO, timeout=120)
            subprocess.run([REPO / "cluster" / "local.sh", "down"], env=env(), check=False, cwd=REPO, timeout=120)
            if mlflow_proc is not None and not args.keep_mlflow:
                stop_mlflow_server(mlflow_proc)
    if mlflow_proc is not None:
        result["mlflow_pid"] = mlflow_proc.pid
    result["timings_s"] = {k: round(v, 1) for k, v in timings.items()} | {"total": round(time.monotonic() - t_all, 1)}
    print(json.dumps(result), flush=True)
    return 0


def _experiment_id(uri: str, run_id: str) -> str:
    import mlflow

    return mlflow.tracking.MlflowClient(uri).get_run(run_id).info.experiment_id


if __name__ == "__main__":
    sys.exit(main())
