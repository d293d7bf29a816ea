"""The main job, end to end on the local 2-node cluster: ``make main-job`` (or ``python cluster/main_job.py``).

Runs exactly what a user runs on a real cluster, on the sample data:

1. ``fdreamer sample-data`` + ``fdreamer make-tiny-models`` (inputs; skipped when present);
2. an MLflow server (sqlite backend) on a free port;
3. ``cluster/local.sh up`` (head + worker node);
4. ``ray job submit --working-dir . -- python pipelines/preprocess.py --config pipelines/configs/tiny.yaml ...``;
5. ``ray job submit --working-dir . -- python training/run.py --config training/configs/tiny_finetune.yaml ...``
   (2 workers spread over both nodes): a fine-tune of the committed tiny I2V (``models/i2v``, installed by
   ``make-tiny-models``) on the sample clips preprocessed with T5 on the motion caption, as it was trained;
   without the committed I2V, ``tiny_stage1.yaml`` from scratch;
6. ``serve deploy`` of ``serving/config.yaml`` pointed at the trained checkpoint (and at the committed tiny
   T2I, ``models/``, for text-to-video's first frame);
7. one text-to-video request through HTTP ("a red circle slides to the right ..."), the mp4 probed and
   decoded with PyAV (``fdreamer.data.video``), and what it shows measured: the subject's colour in frame 0
   and its motion class (``fdreamer.eval.metrics``) in ``served_video``;

then prints where the mp4, the Parquet summary and the MLflow run are, and (unless ``--keep``) stops the
cluster (and with it the Serve app) and the MLflow server. Steps 1-3 start together (separate processes:
their start-up overlaps). Prints one JSON line last; a failure is one line naming the step, exit code 1.

``--storage s3``: the same run with everything in a bucket, as on a cluster (``cluster/local_s3.py``): a
local S3 server (moto) is started first; the sample clips and their manifest are put in the bucket, the
preprocessing job writes its shards and tables there, training reads them and Ray Train writes its
checkpoints there, Serve loads the checkpoint from there and stores the served videos there, and MLflow
proxies its artifacts there. Local disk holds only caches (sample data, tiny models, fetched checkpoints)
and the Ray / MLflow state. The JSON line lists the bucket's keys by prefix.

Needs nothing outside the project's virtualenv but ``bash`` (``cluster/local.sh``): no system ffmpeg. What
is missing is reported in one line before any work starts (exit code 2).
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
from dataclasses import asdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENTRY_POINTS = ("fdreamer", "ray", "serve")  # installed into the virtualenv by `pip install -e .`

from cluster import local_s3  # noqa: E402
from cluster.mlflow_server import free_port, launch_mlflow_server, stop_mlflow_server, wait_mlflow_server  # noqa: E402

RUNTIME_ENV = {"working_dir": ".", "excludes": [".git/", ".venv/", "runs/", "data/", "models/", "mlruns/",
                                                  "**/__pycache__/", "*.mp4", "*.parquet"]}


class StepFailed(RuntimeError):
    """A step of the main job failed; the message is the one line the user sees."""


def missing_requirements() -> str | None:
    """What the main job lacks on this machine, as one line (None: nothing). Checked before any work."""
    absent = [name for name in ENTRY_POINTS if not (BIN / name).is_file()]
    if absent:
        return (f"{', '.join(absent)} not found next to {sys.executable}: "
                "install the project into this virtualenv first (`make setup`, or `pip install -e .`)")
    if shutil.which("bash") is None:
        return "bash not found on PATH (cluster/local.sh needs it): install bash"
    return None


def step(msg: str) -> float:
    print(f"\n== {time.strftime('%H:%M:%S')} {msg}", flush=True)
    return time.monotonic()


def run(cmd: list[Any], **kw: Any) -> subprocess.CompletedProcess:
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    try:
        return subprocess.run([str(c) for c in cmd], check=True, cwd=REPO, **kw)
    except subprocess.CalledProcessError as exc:
        raise StepFailed(f"`{Path(cmd[0]).name} {' '.join(str(c) for c in cmd[1:3])} ...` exited with "
                         f"{exc.returncode} (its output is above)") from None
    except subprocess.TimeoutExpired as exc:
        raise StepFailed(f"`{Path(cmd[0]).name} ...` did not finish within {exc.timeout:.0f} s") from None


class Background:
    """A command started now with its output in a log file; :meth:`wait` prints the log and checks the exit code."""

    def __init__(self, name: str, cmd: list[Any], log: Path, **kw: Any) -> None:
        print("$ " + " ".join(str(c) for c in cmd) + f"   (output: {log})", flush=True)
        self.name, self.log, self.t0 = name, log, time.monotonic()
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, **kw)

    def wait(self, timeout_s: float) -> float:
        """Wait for the command; returns its seconds from start; raises StepFailed unless it exited 0."""
        try:
            rc = self.proc.wait(max(1.0, timeout_s - (time.monotonic() - self.t0)))
        except subprocess.TimeoutExpired:
            self.stop()
            raise StepFailed(f"{self.name} did not finish within {timeout_s:.0f} s; see {self.log}") from None
        print(self.log.read_text().rstrip(), flush=True)
        if rc != 0:
            raise StepFailed(f"{self.name} exited with {rc}; see {self.log}")
        return time.monotonic() - self.t0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def env() -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


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
                message = " ".join(str(app.get("message", "")).split())[:500]
                raise StepFailed(f"serve deploy of {name!r} failed: {message}")
        time.sleep(2)
    raise StepFailed(f"the Serve app did not answer at {base}/readyz within {timeout_s:.0f} s")


def submit(dashboard: str, entrypoint: list[str], timeout_s: float) -> str:
    """``ray job submit`` (streams the job's logs = its progress); returns the job id; fails unless SUCCEEDED."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    job_id = f"fdreamer-{entrypoint[1].split('/')[0]}-{int(time.time())}"
    cmd = [BIN / "ray", "job", "submit", "--address", dashboard, "--submission-id", job_id,
           "--runtime-env-json", json.dumps(RUNTIME_ENV), "--", *entrypoint]
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    try:
        subprocess.run([str(c) for c in cmd], check=False, cwd=REPO, env=env(), timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise StepFailed(f"job {job_id} did not finish within {timeout_s:.0f} s") from None
    status = JobSubmissionClient(dashboard).get_job_status(job_id)
    if status != JobStatus.SUCCEEDED:
        raise StepFailed(f"job {job_id} ended {status} (its log is above; "
                         f"`ray job logs --address {dashboard} {job_id}`)")
    print(f"job {job_id}: {status}", flush=True)
    return job_id


def check_video(path: Path) -> dict[str, Any]:
    """The served mp4 as a player sees it: stream metadata (``probe_video``) and every frame decoded (PyAV).

    Raises ``VideoDecodeError`` (naming the file) when it does not open or a frame does not decode.
    """
    from fdreamer.data.video import probe_video, read_video

    info = probe_video(path)
    clip = read_video(path, info.num_frames, stride=1, backend="pyav")  # frames 0..num_frames-1
    return {**asdict(info), "decoded_frames": int(clip.frames.shape[0])}


PROMPT = {"prompt": "a red circle slides to the right over a soft grey textured background",
          "motion_prompt": "a red circle slides to the right", "colour": "red", "motion": "right"}


def training_plan(models: Path) -> dict[str, Any]:
    """What steps 4-6 run for the tiny models in ``models``: a fine-tune of the committed I2V when
    ``make-tiny-models`` installed it (``i2v_trained``), else stage 1 from scratch; the committed T2I as
    text-to-video's first frame when installed (``unet_trained``)."""
    manifest = json.loads((models / "tiny_models.json").read_text())
    if manifest.get("i2v_trained"):
        plan = {"config": "training/configs/tiny_finetune.yaml", "init_from": str(models / "i2v"),
                "t5_caption": "motion_caption", "name": "main_tiny_finetune"}
    else:
        plan = {"config": "training/configs/tiny_stage1.yaml", "init_from": None, "t5_caption": "caption",
                "name": "main_tiny_stage1"}
    return plan | {"t2i_path": str(models) if manifest.get("unet_trained") else None}


def describe_video(path: Path, colour: str) -> dict[str, Any]:
    """What the served video shows: the subject's colour in frame 0 and the motion class of the subject
    of ``colour`` (:func:`fdreamer.eval.metrics.classify_motion`)."""
    from fdreamer.data.video import probe_video, read_video
    from fdreamer.eval.metrics import classify_motion, subject_colour

    frames = read_video(path, probe_video(path).num_frames, stride=1, backend="pyav").frames
    motion, _ = classify_motion(frames, colour)
    return {"colour": subject_colour(frames[0]), "motion": motion}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=str(REPO / "runs" / "main-job"), help="outputs (git-ignored)")
    p.add_argument("--clips", type=int, default=48)
    p.add_argument("--steps", type=int, default=20, help="training steps (of the fine-tune, or of stage 1 from scratch)")
    p.add_argument("--keep", action="store_true", help="leave the cluster, the app and MLflow running")
    p.add_argument("--keep-mlflow", action="store_true",
                   help="stop the cluster but leave MLflow running after a successful run (pid printed)")
    p.add_argument("--storage", choices=("local", "s3"), default="local",
                   help="where the clips, features, checkpoints, served videos and MLflow artifacts go: the workdir, "
                        "or a bucket of a local S3 server (moto) this run starts, as on a cluster")
    args = p.parse_args(argv)
    for name in ("clips", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    missing = missing_requirements() or (local_s3.moto_missing() if args.storage == "s3" else None)
    if missing:
        print(f"main job: {missing}", file=sys.stderr)
        return 2
    # SIGTERM (a CI timeout, `kill`) unwinds through the finally below, so nothing is left running
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.monotonic()
    timings: dict[str, float] = {}
    os.environ.setdefault("FDREAMER_DASHBOARD_PORT", str(free_port()))
    os.environ.setdefault("FDREAMER_CLUSTER_DIR", str(work / "cluster"))
    os.environ.setdefault("FDREAMER_STORAGE_PATH", str(work / "storage"))
    mlflow_proc = s3_proc = None
    s3: dict[str, str] = {}  # the bucket's URIs and endpoint (--storage s3)
    started: list[Background] = []
    result: dict[str, Any] = {}
    current, ok = "1-3/7", False
    try:
        step("1-3/7 started together: sample data + tiny models, an MLflow server, the local 2-node Ray cluster")
        sample, models, logs = work / "sample", work / "models", work / "logs"
        if not (sample / "_DONE.json").is_file():
            started.append(Background("fdreamer sample-data", [BIN / "fdreamer", "sample-data", sample,
                                                               "--num-clips", args.clips], logs / "sample-data.log"))
        if not (models / "tiny_models.json").is_file():
            started.append(Background("fdreamer make-tiny-models", [BIN / "fdreamer", "make-tiny-models", models],
                                      logs / "make-tiny-models.log"))
        inputs = list(started)
        t_mlflow = time.monotonic()
        if args.storage == "s3":  # before the cluster starts: its nodes inherit the credentials
            os.environ.update(local_s3.CREDENTIALS)
            s3_proc, endpoint = local_s3.launch_s3_server(work / "s3")
            local_s3.wait_s3_server(s3_proc, endpoint)
            root = f"s3://{local_s3.BUCKET}"
            s3 = {"endpoint": endpoint, "preprocessed": f"{root}/preprocessed", "storage": f"{root}/storage",
                  "serving": f"{root}/serving-jobs", "mlflow": f"{root}/mlflow-artifacts"}
            print(f"S3 (moto) at {endpoint}: bucket {root}", flush=True)
        mlflow_proc, mlflow_uri = launch_mlflow_server(work / "mlflow", artifacts=s3.get("mlflow"),
                                                       s3_endpoint=s3.get("endpoint"))
        print(f"$ mlflow server at {mlflow_uri}   (output: {work / 'mlflow' / 'mlflow-server.log'})", flush=True)
        cluster_up = Background("cluster/local.sh up", [REPO / "cluster" / "local.sh", "up"], logs / "cluster-up.log",
                                env=env())
        started.append(cluster_up)

        current = "1/7 sample data and tiny models"
        t = step(current)
        timings["inputs_s"] = max([b.wait(900) for b in inputs], default=time.monotonic() - t)

        current = "2/7 MLflow server (sqlite)"
        step(current)
        wait_mlflow_server(mlflow_proc, mlflow_uri, 180)
        timings["mlflow_s"] = time.monotonic() - t_mlflow  # steps 1-3: from the start until seen ready
        print(f"MLflow tracking server: {mlflow_uri}", flush=True)

        current = "3/7 local 2-node Ray cluster"
        step(current)
        timings["cluster_s"] = cluster_up.wait(300)
        state = json.loads((Path(os.environ["FDREAMER_CLUSTER_DIR"]) / "cluster.json").read_text())
        dashboard = state["dashboard"]

        current = "4/7 ray job submit: preprocessing (Ray Data)"
        t = step(current)
        plan = training_plan(models)
        result["plan"] = plan
        manifest: str = str(sample / "manifest.jsonl")
        pre = s3.get("preprocessed") or str(work / "preprocessed")
        s3_args = [f"--s3_endpoint={s3['endpoint']}"] if s3 else []
        if s3:
            manifest = local_s3.upload_sample(sample, s3["endpoint"])  # the clips and their manifest in the bucket
        else:
            shutil.rmtree(pre, ignore_errors=True)
        result["preprocess_job"] = submit(dashboard, [
            "python", "pipelines/preprocess.py", "--config", "pipelines/configs/tiny.yaml",
            f"--inputs=[{manifest}]", f"--output={pre}", f"--models_dir={models}", *s3_args,
            f"--mlflow_tracking_uri={mlflow_uri}", f"--t5_caption={plan['t5_caption']}"], timeout_s=900)
        timings["preprocess_s"] = time.monotonic() - t

        what = "fine-tune of the committed tiny I2V" if plan["init_from"] else "training stage 1"
        current = f"5/7 ray job submit: {what} (Ray Train, 2 workers)"
        t = step(current)
        storage = s3.get("storage") or os.environ["FDREAMER_STORAGE_PATH"]
        if not s3:
            shutil.rmtree(Path(storage) / plan["name"], ignore_errors=True)
        result["train_job"] = submit(dashboard, [
            "python", "training/run.py", "--config", plan["config"], f"--data.path={pre}", *s3_args,
            f"--models_dir={models}", f"--storage_path={storage}", f"--name={plan['name']}",
            f"--steps={args.steps}", f"--checkpoint.every={args.steps}", f"--tracking.tracking_uri={mlflow_uri}",
            "--tracking.experiment=main-job", "--scaling.placement_strategy=SPREAD",
            *([f"--init_from={plan['init_from']}"] if plan["init_from"] else [])], timeout_s=1200)
        from training.checkpointing import latest_resumable, read_trainer_state

        ckpt = latest_resumable(f"{storage}/{plan['name']}", s3.get("endpoint"))
        if ckpt is None:
            raise StepFailed(f"the training job SUCCEEDED but left no checkpoint under {storage}/{plan['name']}")
        run_id = read_trainer_state(ckpt, s3.get("endpoint")).mlflow_run_id
        timings["train_s"] = time.monotonic() - t

        current = "6/7 serve deploy of the checkpoint (Ray Serve)"
        t = step(current)
        import yaml

        http_port = free_port()
        cfg = yaml.safe_load((REPO / "serving" / "config.yaml").read_text())
        cfg["http_options"].update(host="127.0.0.1", port=http_port)
        app = cfg["applications"][0]
        app["args"].update(checkpoint=ckpt, store=s3.get("serving") or str(work / "serving-jobs"),
                           **({"s3_endpoint": s3["endpoint"]} if s3 else {}))
        if plan["t2i_path"]:
            app["args"]["t2i_path"] = plan["t2i_path"]
        # serve deploy takes only remote working_dir URIs: on this machine the checkout is shared by both
        # nodes, so the replicas import it through PYTHONPATH (a real cluster bakes it into the image)
        serve_cfg = work / "serve.yaml"
        serve_cfg.write_text(yaml.safe_dump(cfg, sort_keys=False))
        run([BIN / "serve", "deploy", serve_cfg, "--address", dashboard], env=env(), timeout=300)
        base = f"http://127.0.0.1:{http_port}"
        wait_serve(base, dashboard, 300)
        timings["serve_s"] = time.monotonic() - t

        current = "7/7 text-to-video over HTTP"
        t = step(current)
        request = {"prompt": PROMPT["prompt"], "num_frames": 8, "height": 64, "width": 64, "num_inference_steps": 20,
                   "seed": 7}
        if plan["t5_caption"] == "motion_caption":
            request["motion_prompt"] = PROMPT["motion_prompt"]  # T5 reads what it was trained on
        body = json.dumps(request).encode()
        req = urllib.request.Request(f"{base}/v1/videos?wait=true", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            job = json.loads(r.read())
        with urllib.request.urlopen(f"{base}/v1/videos/{job['id']}/content", timeout=60) as r:
            mp4 = work / "t2v.mp4"
            mp4.write_bytes(r.read())
        video = check_video(mp4)
        timings["request_s"] = time.monotonic() - t
        shows = describe_video(mp4, PROMPT["colour"])
        result["served_video"] = {**shows, "prompt_colour": PROMPT["colour"], "prompt_motion": PROMPT["motion"]}
        print(f"the served video shows a {shows['colour']} subject, motion {shows['motion']!r} "
              f"(the prompt: {PROMPT['colour']}, {PROMPT['motion']!r})", flush=True)
        result.update({
            "mp4": str(mp4), "mp4_stream": video, "parquet_summary": f"{pre}/summary.json",
            "checkpoint": str(ckpt), "mlflow_ui": mlflow_uri, "mlflow_run_id": run_id,
            "mlflow_run": f"{mlflow_uri}/#/experiments/{_experiment_id(mlflow_uri, run_id)}/runs/{run_id}",
            "dashboard": dashboard, "app": base,
        })
        if s3:  # what the run left in the bucket (the moto server, and they, go when the run ends)
            result["bucket"] = {name: local_s3.list_keys(s3["endpoint"], uri.split("/", 3)[3] + "/")
                                for name, uri in s3.items() if uri.startswith("s3://")}
            result["bucket"]["sample"] = local_s3.list_keys(s3["endpoint"], "sample/")
            result["parquet_summary_json"] = json.loads(_read_s3(f"{pre}/summary.json", s3["endpoint"]))
        print(f"\nvideo:            {mp4}  ({video['decoded_frames']} frames {video['width']}x{video['height']} "
              f"{video['codec']}, all decoded)\nParquet summary:  {pre}/summary.json\ncheckpoint:       {ckpt}\n"
              f"MLflow run:       {result['mlflow_run']}", flush=True)
        ok = True
    except (RuntimeError, OSError, ValueError) as exc:  # StepFailed, MLflow not up, HTTP/file errors, a bad mp4
        print(f"\nmain job failed at {current}: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
        return 1
    finally:
        for proc in started:
            proc.stop()  # only a failed run leaves one running
        if not args.keep:
            step("stopping the cluster (and the Serve app on it) and MLflow")
            down = subprocess.Popen([REPO / "cluster" / "local.sh", "down"], env=env(), cwd=REPO)
            if mlflow_proc is not None and not (args.keep_mlflow and ok):
                stop_mlflow_server(mlflow_proc)
            try:
                down.wait(120)
            except subprocess.TimeoutExpired:
                down.kill()
        if s3_proc is not None and not args.keep:
            local_s3.stop_s3_server(s3_proc)
        if args.keep:  # what is left running, and the exact commands that stop it
            from cluster.local import stop_command

            print("\n--keep: left running; stop with:\n  " + stop_command(Path(os.environ["FDREAMER_CLUSTER_DIR"]))
                  + "".join(f"\n  kill {proc.pid}   # {what}" for what, proc in (("MLflow server", mlflow_proc),
                                                                                ("S3 server (moto)", s3_proc))
                            if proc is not None),
                  flush=True)
    if mlflow_proc is not None:
        result["mlflow_pid"] = mlflow_proc.pid
    result["timings_s"] = {k: round(v, 1) for k, v in timings.items()} | {"total": round(time.monotonic() - t_all, 1)}
    print(json.dumps(result), flush=True)
    return 0


def _read_s3(uri: str, endpoint: str) -> bytes:
    from fdreamer.data import storage

    fs, path = storage.resolve(uri, endpoint)
    return storage.read_bytes(fs, path)


def _experiment_id(uri: str, run_id: str) -> str:
    import mlflow

    return mlflow.tracking.MlflowClient(uri).get_run(run_id).info.experiment_id


if __name__ == "__main__":
    sys.exit(main())
