"""The Ray Train job end to end on a real local Ray cluster, logging to a real MLflow server.

Runs ``training/run.py`` as a user does (a subprocess with ``--ray_address`` of the session's
``ray start --head`` cluster) on the preprocessed sample clips with ``training/configs/tiny_*.yaml``:
2 workers (DDP over gloo), MLflow params/metrics/artifacts, exact resume, a worker killed mid-run,
stage 1 -> 2 -> 3 chaining, and the precise errors of bad configurations.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
import torch
from helpers.ray_cluster import REPO, subprocess_env
from safetensors.torch import load_file

pytestmark = pytest.mark.timeout(900)
RUN = [sys.executable, str(REPO / "training" / "run.py")]


def _args(cfg: str, data: dict, storage: Path, address: str, *extra: str) -> list[str]:
    return [*RUN, "--config", str(REPO / "training" / "configs" / f"{cfg}.yaml"), f"--data.path={data['output']}",
            f"--models_dir={data['models']}", f"--storage_path={storage}", f"--ray_address={address}", *extra]


def _train(cfg: str, data: dict, storage: Path, address: str, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(_args(cfg, data, storage, address, *extra), env=subprocess_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _summary(proc: subprocess.CompletedProcess) -> dict:
    """The JSON line ``training/run.py`` prints last."""
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{") and '"checkpoint"' in ln]
    assert lines, proc.stdout[-3000:]
    return json.loads(lines[-1])


def _order(run_dir: Path) -> dict[int, list[tuple[int, list[str]]]]:
    """rank -> [(step, clip ids)] from the data-order logs (last record of a step wins)."""
    out = {}
    for f in sorted((run_dir / "data_order").glob("rank*.jsonl")):
        steps: dict[int, list[str]] = {}
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            steps[rec["step"]] = rec["clip_ids"]
        out[int(f.stem[4:])] = sorted(steps.items())
    return out


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("train-runs")


@pytest.fixture(scope="module")
def stage1(preprocessed_sample: dict, storage: Path, ray_head: dict, mlflow_server: str) -> dict:
    """Tiny stage 1: 12 steps, 2 workers, validation at 0/6/12, a sample mp4 at the end, data order logged."""
    proc = _train("tiny_stage1", preprocessed_sample, storage, ray_head["address"], "--steps=12",
                  "--checkpoint.every=6", "--tracking.validate_every=6", "--tracking.log_every=2",
                  f"--tracking.tracking_uri={mlflow_server}", "--tracking.experiment=test-training",
                  "--data.log_order=true", "--optim.lr=2e-3")
    return {"proc": proc, "summary": _summary(proc), "run_dir": storage / "tiny_stage1"}


def test_stage1_logs_run_params_metrics_and_sample_video(stage1: dict, mlflow_server: str) -> None:
    client = mlflow.tracking.MlflowClient(mlflow_server)
    run = client.get_run(stage1["summary"]["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.002" and run.data.params["scaling.num_workers"] == "2"
    assert run.data.params["schedule.prediction_type"] == "v_prediction"
    assert run.data.tags["fdreamer.stage"] == "stage1"
    for key in ("loss", "l_df", "lr", "grad_norm", "samples_per_s", "data_wait_fraction", "val_loss"):
        assert key in run.data.metrics, key
    assert 0.0 <= run.data.metrics["data_wait_fraction"] <= 1.0
    val = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "val_loss"), key=lambda m: m.step)]
    assert len(val) == 3  # steps 0, 6, 12
    assert val[-1] < 0.85 * val[0], val  # a clear drop on held-out clips
    names = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert any(n.endswith(".mp4") for n in names), names
    local = Path(client.download_artifacts(run.info.run_id, next(n for n in names if n.endswith(".mp4"))))
    probe = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
                            "stream=codec_name,nb_read_frames,width,height", "-of", "json", str(local)],
                           capture_output=True, text=True, check=True)
    stream = json.loads(probe.stdout)["streams"][0]
    assert stream["codec_name"] == "h264" and int(stream["nb_read_frames"]) == 8
    ckpt_files = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")]
    assert "checkpoint/model.safetensors" in ckpt_files
    state = json.loads((Path(stage1["summary"]["checkpoint"]) / "trainer_state.json").read_text())
    assert state["step"] == 12 and state["world_size"] == 2


def test_exact_resume_matches_uninterrupted_run(stage1: dict, preprocessed_sample: dict, storage: Path,
                                                ray_head: dict, mlflow_server: str) -> None:
    common = ["--name=resume", "--checkpoint.every=3", "--data.log_order=true", "--optim.lr=2e-3",
              "--tracking.sample_every=-1", f"--tracking.tracking_uri={mlflow_server}",
              "--tracking.experiment=test-training"]
    _train("tiny_stage1", preprocessed_sample, storage, ray_head["address"], "--steps=6", *common)
    proc = _train("tiny_stage1", preprocessed_sample, storage, ray_head["address"], "--steps=12", "--resume", *common)
    assert "resuming from" in proc.stdout
    straight = load_file(str(Path(stage1["summary"]["checkpoint"]) / "model.safetensors"))
    resumed = load_file(str(Path(_summary(proc)["checkpoint"]) / "model.safetensors"))
    assert straight.keys() == resumed.keys()
    diffs = {k: float((straight[k] - resumed[k]).abs().max()) for k in straight}
    assert max(diffs.values()) <= 1e-6, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]
    assert _order(storage / "resume") == _order(stage1["run_dir"])  # same clips, same steps, both ranks
    assert len(_order(storage / "resume")) == 2


def test_worker_killed_mid_run_restarts_from_checkpoint(preprocessed_sample: dict, storage: Path,
                                                       ray_head: dict, mlflow_server: str) -> None:
    run_dir = storage / "faulty"
    cmd = _args("tiny_stage1", preprocessed_sample, storage, ray_head["address"], "--name=faulty", "--steps=10",
                "--checkpoint.every=3", "--checkpoint.max_failures=2", "--data.log_order=true",
                "--tracking.sample_every=-1", f"--tracking.tracking_uri={mlflow_server}",
                "--tracking.experiment=test-training")
    proc = subprocess.Popen(cmd, env=subprocess_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    killed = None
    try:
        deadline = time.monotonic() + 400
        while killed is None and time.monotonic() < deadline and proc.poll() is None:
            log = run_dir / "data_order" / "rank1.jsonl"
            if (run_dir / "checkpoint_step_00000003").is_dir() and log.is_file():
                recs = [json.loads(x) for x in log.read_text().splitlines()]
                if recs and recs[-1]["step"] >= 4:
                    killed = recs[-1]["pid"]
                    os.kill(killed, signal.SIGKILL)
            time.sleep(0.5)
        assert killed is not None, "the run never reached step 4"
        assert proc.wait(timeout=500) == 0, "".join(out)[-5000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(10)
    state = json.loads((run_dir / "checkpoint_step_00000010" / "trainer_state.json").read_text())
    assert state["step"] == 10
    pids = {json.loads(x)["pid"] for x in (run_dir / "data_order" / "rank1.jsonl").read_text().splitlines()}
    assert killed in pids and len(pids) >= 2  # rank 1 ran in a new process after the kill
    steps = [json.loads(x)["step"] for x in (run_dir / "data_order" / "rank0.jsonl").read_text().splitlines()]
    assert steps[-1] == 9 and steps.count(3) == 2  # step 3 (after checkpoint 3) was redone


def test_stage_chaining_and_flow_loss(stage1: dict, preprocessed_sample: dict, storage: Path, ray_head: dict,
                                      mlflow_server: str) -> None:
    common = [f"--tracking.tracking_uri={mlflow_server}", "--tracking.experiment=test-training",
              "--tracking.sample_every=-1", "--steps=4", "--checkpoint.every=4"]
    s2 = _summary(_train("tiny_stage2", preprocessed_sample, storage, ray_head["address"],
                         f"--init_from=runs:/{stage1['summary']['mlflow_run_id']}", *common))
    s3 = _summary(_train("tiny_stage3", preprocessed_sample, storage, ray_head["address"],
                         f"--init_from={storage / 'tiny_stage2'}", *common))
    client = mlflow.tracking.MlflowClient(mlflow_server)
    assert "l_flow" in client.get_run(s3["mlflow_run_id"]).data.metrics
    assert "l_flow" not in client.get_run(s2["mlflow_run_id"]).data.metrics
    w1 = load_file(str(Path(stage1["summary"]["checkpoint"]) / "model.safetensors"))
    w3 = load_file(str(Path(s3["checkpoint"]) / "model.safetensors"))
    assert any(k.startswith("predictnet.") for k in w3) and not any(k.startswith("predictnet.") for k in w1)
    key = "temporal.down.0.attn.0.self_attn.to_q.weight"
    key = key if key in w1 else next(k for k in w1 if k.startswith("temporal."))
    assert not torch.equal(w1[key], w3[key])  # trained further, from stage 1's weights


def _fails(args: list[str], needle: str) -> None:
    """``training/run.py`` exits 2 with ``needle`` in its one-line error, before any worker starts."""
    proc = subprocess.run([*RUN, *args], check=False, env=subprocess_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert needle in proc.stderr, proc.stderr[-2000:]


def _prepare_fails(args: list[str], needle: str) -> None:
    """The same checks in-process (``training.launch.prepare``), faster than a subprocess each."""
    from fdreamer.config import parse_cli
    from training.config import TrainConfig
    from training.launch import prepare

    with pytest.raises(Exception, match=needle.replace("(", r"\(").replace(")", r"\)")):
        prepare(parse_cli(TrainConfig, args)[0])


def test_clear_errors(preprocessed_sample: dict, stage1: dict, tmp_path: Path) -> None:
    cfg = ["--config", str(REPO / "training/configs/tiny_stage1.yaml"), f"--storage_path={tmp_path}"]
    data = f"--data.path={preprocessed_sample['output']}"
    _fails([*cfg, f"--data.path={tmp_path / 'nope'}"], "does not exist")
    _prepare_fails([*cfg, data, "--global_batch=6"], "not divisible by num_workers x micro_batch")
    _prepare_fails([*cfg, data, "--name=bad", "--model.factorized=false",
                    f"--init_from={stage1['summary']['checkpoint']}"], "incompatible model config")
    import pyarrow.parquet as pq

    old = tmp_path / "old"  # shards of another schema version
    (old / "shards").mkdir(parents=True)
    src = min((Path(preprocessed_sample["output"]) / "shards").glob("part-*.parquet"))
    table = pq.read_table(src)
    pq.write_table(table.replace_schema_metadata({b"fdreamer.schema_version": b"1"}), old / "shards" / src.name)
    _prepare_fails([*cfg, f"--data.path={old}"], "schema version 1")
    _prepare_fails([*cfg, data, f"--storage_path={stage1['run_dir'].parent}"], "pass --resume")
    _prepare_fails([*cfg, data, "--scaling.parallel=fsdp"], "needs scaling.use_gpu=true")


@pytest.mark.slow
def test_ablate_prints_the_six_row_table(preprocessed_sample: dict, ray_head: dict, mlflow_server: str,
                                          tmp_path: Path) -> None:
    """``training/ablate.py`` on tiny settings: six Ray Train runs (2 steps each, 1 worker), one MLflow run
    per Table 4 row in one experiment, and the markdown table read back from MLflow."""
    cmd = [sys.executable, str(REPO / "training" / "ablate.py"), "--config",
           str(REPO / "training" / "configs" / "tiny_stage1.yaml"), f"--data.path={preprocessed_sample['output']}",
           f"--models_dir={preprocessed_sample['models']}", f"--storage_path={tmp_path}",
           f"--ray_address={ray_head['address']}", "--steps=2", "--checkpoint.every=2", "--scaling.num_workers=1",
           "--global_batch=4", "--micro_batch=2", "--tracking.validate_every=2", "--tracking.sample_every=-1",
           f"--tracking.tracking_uri={mlflow_server}", "--tracking.experiment=test-ablate"]
    proc = subprocess.run(cmd, env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=900,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("| (")]
    assert [r.split("|")[1].strip() for r in rows] == ["(a)", "(a*)", "(b)", "(c)", "(d)", "(e)"], proc.stdout[-3000:]
    client = mlflow.tracking.MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("test-ablate-table4")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.data.tags["table4_row"] for r in runs) == ["a", "a*", "b", "c", "d", "e"]
    for run in runs:  # every cell of the table is a number read back from that run
        row = next(r for r in rows if r.split("|")[1].strip() == f"({run.data.tags['table4_row']})")
        assert f"{run.data.metrics['val_loss']:.4f}" in row
    by_row = {r.data.tags["table4_row"]: r for r in runs}
    assert by_row["a"].data.params["schedule.shift"] == "False" and by_row["e"].data.params["schedule.shift"] == "True"
    assert "l_flow" in by_row["e"].data.metrics and "l_flow" not in by_row["d"].data.metrics
