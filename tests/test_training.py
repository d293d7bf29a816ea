"""The Ray Train job end to end on a real local Ray cluster, logging to a real MLflow server.

Runs ``training/run.py`` as a user does (a subprocess with ``--ray_address`` of the session's
``ray start --head`` cluster) on the preprocessed sample clips with ``training/configs/tiny_*.yaml``:
2 workers (DDP over gloo), MLflow params/metrics/artifacts and learning, exact resume through a worker
killed mid-run (checkpoints in a moto S3 bucket: ``storage_path: s3://``, ``init_from: s3://``), stage chaining (stage 3 with PredictNet from stage 1), the precise errors of bad
configurations, and no dead config key. Three Ray Train runs in all: stage 1 (12 steps), its step-6
checkpoint resumed to 12 with a worker killed, a 2-step stage 3 from it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from helpers.ffprobe import mp4_info
from helpers.ray_cluster import REPO, subprocess_env
from helpers.worker_kill import run_killing_worker
from safetensors.torch import load_file

from fdreamer.checkpoint import read_meta

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
    """Tiny stage 1: 12 steps, 2 workers, validation at 0/6/12, a sample mp4 at the end, data order logged.

    The one uninterrupted Ray Train run of this module: the resume / worker-kill run continues its step-6
    checkpoint, the stage-3 run starts from its MLflow run, the error checks use its checkpoints."""
    proc = _train("tiny_stage1", preprocessed_sample, storage, ray_head["address"], "--steps=12",
                  "--checkpoint.every=6", "--tracking.validate_every=6", "--tracking.log_every=2",
                  f"--tracking.tracking_uri={mlflow_server}", "--tracking.experiment=test-training",
                  "--data.log_order=true", "--optim.lr=2e-3")
    return {"proc": proc, "summary": _summary(proc), "run_dir": storage / "tiny_stage1"}


def test_stage1_logs_run_params_metrics_and_sample_video(stage1: dict, mlflow_server: str) -> None:
    """MLflow params / metrics / artifacts of the run, and a learning signal that cannot flake.

    The run is deterministic given its data: two runs on one preprocessing output logged identical
    ``val_loss`` and ``loss`` to the last digit. The data order could differ between test sessions when
    shards were named ``part-<time>-<uuid>`` (now ``part-<sha1 of clip ids>``, the same in two runs here,
    but Ray Data does not promise how the write batches form), so the margins below were measured over
    shard orders (same seed, other shard order:
    ``val_loss`` [1.0574, 0.8084, 0.8027] and [1.0574, 0.8311, 0.7063] here, [1.057, 0.830, 0.907] on
    CI). ``val_loss`` at step 0 is the untrained baseline, 1.0574 in every run (same init, fixed noise);
    only the 2 clips of the sample's heldout split are held out and lr 2e-3 overshoots now and then, so
    one later point alone is noise-bound (the old ``last < 0.85 x first`` flaked at 0.858).

    Measured, as a ratio to the untrained ``val_loss`` (15 healthy runs: 12 in-process replicas of this
    run on one preprocessing output with data-order / noise seeds 0..11, the 2 Ray runs above, CI's;
    the broken control is the replica with lr 0):

    - mean ``val_loss`` of steps 6 and 12: 0.727-0.822 (mean 0.767, sd 0.031); lr 0: 1.000;
    - ``val_loss`` at step 12: 0.665-0.858 (mean 0.723, sd 0.050); lr 0: 1.000;
    - mean train ``loss`` of steps 8, 10, 12 (14 runs, no CI numbers): 0.680-0.810; lr 0: 1.091.

    Hence: the first and third below 0.95 (>= 4 sd above the worst healthy run), the last point below the
    baseline; a run that does not learn fails all three.
    """
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
    untrained = val[0]
    assert sum(val[1:]) / 2 < 0.95 * untrained, val
    assert val[-1] < untrained, val
    loss = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert sorted(loss) == [2, 4, 6, 8, 10, 12]
    late = [loss[8], loss[10], loss[12]]
    assert sum(late) / 3 < 0.95 * untrained, (late, untrained)
    names = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert any(n.endswith(".mp4") for n in names), names
    local = Path(client.download_artifacts(run.info.run_id, next(n for n in names if n.endswith(".mp4"))))
    info = mp4_info(local)  # PyAV, and ffprobe where installed
    assert info["codec"] == "h264" and info["frames"] == 8
    ckpt_files = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")]
    assert "checkpoint/model.safetensors" in ckpt_files
    final = Path(stage1["summary"]["checkpoint"])
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["step"] == 12 and state["world_size"] == 2
    meta = read_meta(final)  # inference defaults: pixel size = 16 latent px x the tiny VAE's factor 4
    assert (meta["num_frames"], meta["latent_size"], meta["size"]) == (8, 16, 64), meta
    assert meta["t5_caption"] == "caption"  # what T5 read, so inference feeds it the same text


@pytest.fixture(scope="module")
def resumed(stage1: dict, preprocessed_sample: dict, storage: Path, ray_head: dict, mlflow_server: str,
            s3_endpoint: str) -> dict:
    """Stage 1's step-6 checkpoint continued to step 12 with ``--resume`` on S3, rank 1 SIGKILLed on the way.

    The checkpoint is put in a bucket as the only one of a new run (``storage_path: s3://train-runs``,
    ``--name=resume``; the session's moto server) and detached from stage 1's MLflow run. The workers fetch
    it from there; checkpoints every 2 steps go to the bucket; once ``checkpoint_step_00000008`` is there and
    rank 1 has logged step 8, its process is killed, so Ray Train (``checkpoint.max_failures=2``) restarts
    the worker group from the latest checkpoint in the bucket. Every option that changes the numbers is
    stage 1's; the data-order logs go to a local folder (``data.log_order_dir``)."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="train-runs")
    source = stage1["run_dir"] / "checkpoint_step_00000006"
    for f in source.iterdir():
        body = f.read_bytes()
        if f.name == "trainer_state.json":
            body = json.dumps({**json.loads(body), "mlflow_run_id": None}).encode()
        s3.put_object(Bucket="train-runs", Key=f"resume/{source.name}/{f.name}", Body=body)
    run_dir = storage / "resume"  # local: the data-order logs
    cmd = _args("tiny_stage1", preprocessed_sample, "s3://train-runs", ray_head["address"], "--name=resume",
                "--steps=12", "--resume", "--checkpoint.every=2", "--checkpoint.max_failures=2",
                "--data.log_order=true", f"--data.log_order_dir={run_dir / 'data_order'}", f"--s3_endpoint={s3_endpoint}",
                "--optim.lr=2e-3", "--tracking.sample_every=-1", "--tracking.validate_every=0",
                f"--tracking.tracking_uri={mlflow_server}", "--tracking.experiment=test-training")

    def in_bucket(key: str) -> bool:
        return s3.list_objects_v2(Bucket="train-runs", Prefix=key).get("KeyCount", 0) > 0

    text, killed = run_killing_worker(cmd, run_dir / "data_order" / "rank1.jsonl", 8, timeout_s=500,
                                      ready=lambda: in_bucket("resume/checkpoint_step_00000008/"))
    assert killed is not None, "the resumed run finished before rank 1 reached step 8:\n" + text[-3000:]
    summary = json.loads([ln for ln in text.splitlines() if ln.startswith("{") and '"checkpoint"' in ln][-1])
    from training.checkpointing import local_checkpoint

    return {"stdout": text, "killed": killed, "run_dir": run_dir, "summary": summary, "s3_endpoint": s3_endpoint,
            "final": local_checkpoint(summary["checkpoint"], s3_endpoint, resume=True)}


def test_exact_resume_matches_uninterrupted_run(stage1: dict, resumed: dict) -> None:
    """6 steps + ``--resume`` to 12 on S3 (through a worker restart) = the 12 uninterrupted steps of stage 1."""
    assert "resuming from s3://train-runs/resume/checkpoint_step_00000006 (step 6)" in resumed["stdout"]
    assert resumed["summary"]["checkpoint"] == "s3://train-runs/resume/checkpoint_step_00000012"
    straight = load_file(str(Path(stage1["summary"]["checkpoint"]) / "model.safetensors"))
    continued = load_file(str(resumed["final"] / "model.safetensors"))
    assert straight.keys() == continued.keys()
    diffs = {k: float((straight[k] - continued[k]).abs().max()) for k in straight}
    assert max(diffs.values()) <= 1e-6, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]
    order, straight_order = _order(resumed["run_dir"]), _order(stage1["run_dir"])
    assert sorted(order) == [0, 1]
    for rank, steps in order.items():  # same clips at the same steps on both ranks
        assert steps == [s for s in straight_order[rank] if s[0] >= 6], rank


def test_worker_killed_mid_run_restarts_from_checkpoint(resumed: dict, mlflow_server: str) -> None:
    run_dir = resumed["run_dir"]
    state = json.loads((resumed["final"] / "trainer_state.json").read_text())
    assert state["step"] == 12
    pids = {json.loads(x)["pid"] for x in (run_dir / "data_order" / "rank1.jsonl").read_text().splitlines()}
    assert resumed["killed"] in pids and len(pids) >= 2  # rank 1 ran in a new process after the kill
    steps = [json.loads(x)["step"] for x in (run_dir / "data_order" / "rank0.jsonl").read_text().splitlines()]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    assert steps[:restart] == list(range(6, steps[restart - 1] + 1))  # 6.. up to the kill
    assert steps[restart] in (8, 10), steps  # redone from a checkpoint written after the resume (every 2)
    assert steps[restart:] == list(range(steps[restart], 12)), steps
    # no batch replayed to reach the restart position: since the restart, rank 0's reader collated the
    # micro-batches of the remaining steps (2 per step) plus at most its prefetch (2), not the epoch's earlier ones
    client = mlflow.tracking.MlflowClient(mlflow_server)
    built = client.get_metric_history(resumed["summary"]["mlflow_run_id"], "data/train_built_batches")
    final = max(built, key=lambda m: m.step)
    assert final.step == 12 and (12 - steps[restart]) * 2 <= final.value <= (12 - steps[restart]) * 2 + 2, built


def test_epochs_see_different_orders_and_ranks_disjoint_rows(stage1: dict) -> None:
    """The data-order logs of the uninterrupted run: each epoch a new order of the rows (block order and shuffle
    windows reseeded), and within an epoch the two ranks never train on the same clip."""
    epochs: dict[int, dict[int, list[str]]] = {}
    for f in sorted((stage1["run_dir"] / "data_order").glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            epochs.setdefault(rec["epoch"], {}).setdefault(int(f.stem[4:]), []).extend(rec["clip_ids"])
    assert len(epochs) >= 3, sorted(epochs)
    for by_rank in epochs.values():
        assert not set(by_rank[0]) & set(by_rank[1])
        assert len(set(by_rank[0])) == len(by_rank[0])
    assert epochs[0][0] != epochs[1][0] and epochs[1][0] != epochs[2][0]


def test_stage2_init_from_a_run_folder_resolves_to_its_latest_checkpoint(stage1: dict, preprocessed_sample: dict,
                                                                       storage: Path) -> None:
    """Stage 2's ``init_from`` = stage 1's run folder resolves (driver side, no workers) to the run's latest
    checkpoint. Chaining through a Ray Train run (``runs:/<id>``, PredictNet added, γ·L_flow) is
    ``test_ablate_row_e_chains_from_stage1_and_adds_the_flow_loss``."""
    from fdreamer.config import parse_cli
    from training.config import TrainConfig
    from training.launch import prepare

    stage2, _ = parse_cli(TrainConfig, ["--config", str(REPO / "training/configs/tiny_stage2.yaml"),
                                        f"--data.path={preprocessed_sample['output']}", f"--storage_path={storage}",
                                        f"--init_from={stage1['run_dir']}"])
    assert prepare(stage2)["init_from"] == str(Path(stage1["summary"]["checkpoint"]))


def test_stage2_init_from_an_s3_run_folder(resumed: dict, preprocessed_sample: dict, storage: Path) -> None:
    """``init_from: s3://...`` (the resumed run's folder in the bucket): the driver finds its latest checkpoint
    there and checks it fits; the workers' ``build_model`` fetches it (without the optimizer state) and loads
    exactly its weights."""
    from fdreamer.config import parse_cli
    from training.config import TrainConfig
    from training.launch import prepare
    from training.loop import build_model

    stage2, _ = parse_cli(TrainConfig, ["--config", str(REPO / "training/configs/tiny_stage2.yaml"),
                                        f"--data.path={preprocessed_sample['output']}", f"--storage_path={storage}",
                                        "--name=from_s3", "--init_from=s3://train-runs/resume",
                                        f"--s3_endpoint={resumed['s3_endpoint']}"])
    loop_config = prepare(stage2)
    assert loop_config["init_from"] == "s3://train-runs/resume/checkpoint_step_00000012"
    state = build_model(stage2, loop_config["init_from"]).state_dict()
    saved = load_file(str(resumed["final"] / "model.safetensors"))
    assert all(torch.equal(state[k], v) for k, v in saved.items() if k in state)


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
    # no row has split 'val': the error names the rule and what the data holds
    _prepare_fails([*cfg, data, "--data.split=val"], "0 training rows after filters (split == 'val'")
    _prepare_fails([*cfg, data, "--data.split=val"], "rows per split value in the data: {\"'heldout'\": ")
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
    # FSDP runs on CPU now (tests/test_fsdp.py); what stays refused is an EMA of sharded weights
    _prepare_fails([*cfg, data, "--scaling.parallel=fsdp", "--optim.ema_decay=0.9"],
                   "optim.ema_decay must be 0 with scaling.parallel=fsdp")


@pytest.mark.slow
def test_ablate_row_e_chains_from_stage1_and_adds_the_flow_loss(stage1: dict, preprocessed_sample: dict,
                                                                ray_head: dict, mlflow_server: str,
                                                                tmp_path: Path) -> None:
    """``training/ablate.py --rows=[e] --init_from=runs:/<stage 1's MLflow run>``: one Ray Train run (2 steps,
    1 worker) that is both the ablation plumbing and stage chaining (as ``tiny_stage3.yaml`` does it):

    - the row's MLflow run is tagged with its Table 4 row, and the markdown table is read back from MLflow
      (every row's switches are checked without training in tests/test_compare.py);
    - ``init_from`` as an MLflow run id resolves to stage 1's final checkpoint, the PredictNet of row (e)
      is added to those weights (Eq. 4) and ``γ·L_flow`` is logged (stage 1 has no l_flow);
    - the temporal weights continue from stage 1's, not from a fresh model."""
    from fdreamer.checkpoint import latest_checkpoint
    from fdreamer.config import load_config
    from fdreamer.models import FactorizedDreamerUNet
    from training.config import TrainConfig

    cmd = [sys.executable, str(REPO / "training" / "ablate.py"), "--config",
           str(REPO / "training" / "configs" / "tiny_stage1.yaml"), f"--data.path={preprocessed_sample['output']}",
           f"--models_dir={preprocessed_sample['models']}", f"--storage_path={tmp_path}", "--rows=[e]",
           f"--init_from=runs:/{stage1['summary']['mlflow_run_id']}",
           f"--ray_address={ray_head['address']}", "--steps=2", "--checkpoint.every=2", "--scaling.num_workers=1",
           "--global_batch=4", "--micro_batch=2", "--tracking.validate_every=2", "--tracking.sample_every=-1",
           f"--tracking.tracking_uri={mlflow_server}", "--tracking.experiment=test-ablate"]
    proc = subprocess.run(cmd, env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=900,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("| (")]
    assert [r.split("|")[1].strip() for r in rows] == ["(e)"], proc.stdout[-3000:]
    client = mlflow.tracking.MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("test-ablate-table4")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.tags["table4_row"] == "e" and run.info.status == "FINISHED"
    assert f"{run.data.metrics['val_loss']:.4f}" in rows[0]  # the cell is the number read back from that run
    assert run.data.params["schedule.shift"] == "True" and run.data.params["model.predictnet"] == "True"
    assert "l_flow" in run.data.metrics
    assert "l_flow" not in client.get_run(stage1["summary"]["mlflow_run_id"]).data.metrics

    w1 = load_file(str(Path(stage1["summary"]["checkpoint"]) / "model.safetensors"))
    w3 = load_file(str(latest_checkpoint(tmp_path / "ablate_e") / "model.safetensors"))
    assert any(k.startswith("predictnet.") for k in w3) and not any(k.startswith("predictnet.") for k in w1)
    tiny = load_config(TrainConfig, REPO / "training" / "configs" / "tiny_stage1.yaml")
    fresh = FactorizedDreamerUNet.from_preset("tiny", tiny.model, seed=0).state_dict()
    temporal = [k for k in w1 if k.startswith("temporal.")]
    assert not all(torch.equal(w1[k], w3[k]) for k in temporal)  # trained further ...
    from_stage1 = sum(float((w3[k] - w1[k]).pow(2).sum()) for k in temporal)
    from_fresh = sum(float((w3[k] - fresh[k]).pow(2).sum()) for k in temporal)
    assert from_stage1 < 0.25 * from_fresh, (from_stage1, from_fresh)  # ... from stage 1's weights


def _config_attribute_reads(roots: list[Path]) -> set[str]:
    """Attribute names read anywhere in the product code, except inside the dataclasses' own checks
    (``__post_init__`` / ``_check*``: validating a key is not using it)."""
    import ast

    names: set[str] = set()
    for root in roots:
        for file in root.rglob("*.py"):
            tree = ast.parse(file.read_text(), str(file))
            skipped = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                       and (f.name == "__post_init__" or f.name.startswith("_check")) for n in ast.walk(f)}
            names.update(n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and id(n) not in skipped)
    return names


def test_every_config_key_is_read() -> None:
    """Every key of TrainConfig (with its nested model / schedule / data / ... sections) is read by the code
    (``objective.timestep_sampling`` once was not, so ``logit_normal`` trained uniform). A key read by no
    code is dead: make it work (with a test) or remove it."""
    from fdreamer.config import flatten, load_config, to_dict
    from training.config import TrainConfig

    read = _config_attribute_reads([REPO / "fdreamer", REPO / "training", REPO / "serving", REPO / "pipelines"])
    dead = [key for key in flatten(to_dict(TrainConfig())) if key.rsplit(".", 1)[-1] not in read]
    assert not dead, f"config keys read by no code: {dead}"
    named_runs = sorted((REPO / "training" / "configs").glob("*.yaml"))
    assert len(named_runs) >= 11
    for path in named_runs:  # strict loading: a key that is no field of TrainConfig is a ConfigError
        load_config(TrainConfig, path)
