"""The training job reads its data from S3: ``data.path: s3://bucket/prefix`` with ``s3_endpoint`` (a moto
server on 127.0.0.1), through the same pyarrow filesystem layer as the preprocessing job.

The session's preprocessed sample (32 clips) is copied to a bucket as is; every driver-side read of
``training/launch.prepare`` (shard listing, schema check, null conditions, row count, clip profile), the
held-out batch (a filtered scan) and the workers' streams (:mod:`training.stream`) must give what they
give on the local folder. Checkpoints in a bucket: the latest found by step, fetched into
the local cache, loaded as saved.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.ray_cluster import REPO

from fdreamer.config import load_config
from training.config import TrainConfig

CONFIG = REPO / "training" / "configs" / "tiny_stage1.yaml"


@pytest.fixture(scope="module")
def s3_data(preprocessed_sample: dict, s3_endpoint: str) -> dict:
    """The session's moto S3 server holding a copy of the preprocessed sample under ``s3://features/sample``."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="features")
    root = Path(preprocessed_sample["output"])
    for f in root.rglob("*"):
        if f.is_file() and not f.name.startswith("."):
            s3.upload_file(str(f), "features", f"sample/{f.relative_to(root).as_posix()}")
    return {"endpoint": s3_endpoint, "uri": "s3://features/sample", "local": str(root),
            "models": str(preprocessed_sample["models"])}


def _cfg(path: str, s3: dict, tmp: Path) -> TrainConfig:
    return load_config(TrainConfig, CONFIG, [f"data.path={path}", f"s3_endpoint={s3['endpoint']}",
                                             f"models_dir={s3['models']}", f"storage_path={tmp}"])


def test_prepare_and_heldout_batch_read_s3_like_local(s3_data: dict, tmp_path: Path) -> None:
    from training import data as train_data
    from training.launch import prepare

    remote, local = _cfg(s3_data["uri"], s3_data, tmp_path), _cfg(s3_data["local"], s3_data, tmp_path)
    got, want = prepare(remote), prepare(local)
    assert got["rows"] == want["rows"] > 0
    assert got["meta"] == want["meta"] and got["meta"]["latent_size"] == 16
    assert json.loads(json.dumps(got["cfg"]))["data"]["path"] == s3_data["uri"]  # the workers read S3 too
    a, b = train_data.heldout_batch(remote), train_data.heldout_batch(local)
    assert a is not None and a.latents.shape[0] == b.latents.shape[0] > 0
    assert a.clip_ids == b.clip_ids and torch.equal(a.latents, b.latents)
    assert torch.equal(a.cond.first_frame, b.cond.first_frame) and torch.equal(a.cond.t5_tokens, b.cond.t5_tokens)
    null_a, null_b = train_data.load_null(s3_data["uri"], s3_data["endpoint"]), train_data.load_null(s3_data["local"])
    assert all(torch.equal(null_a[k], null_b[k]) for k in null_b)
    summary = train_data.data_summary(s3_data["uri"], s3_data["endpoint"])
    assert summary == train_data.data_summary(s3_data["local"]) and summary["written"] >= want["rows"]


def test_worker_streams_read_the_s3_shards_like_local(s3_data: dict, tmp_path: Path) -> None:
    """What a worker trains on (:func:`training.data.open_stream` over the block counts ``prepare`` made), read
    from the bucket: the same batches, in the same order, as from the local folder, for both ranks of 2."""
    from training import data as train_data
    from training.launch import prepare
    from training.order import Blocks

    def epoch(cfg: TrainConfig, rank: int) -> list:
        blocks = Blocks.from_dict(prepare(cfg)["blocks"]["train"])
        stream = train_data.open_stream(cfg, "train", blocks, rank=rank, world=2)
        batches = []
        while (batch := stream.next()) is not None:
            batches.append(batch)
        stream.close()
        return batches

    remote, local = _cfg(s3_data["uri"], s3_data, tmp_path), _cfg(s3_data["local"], s3_data, tmp_path / "l")
    for rank in (0, 1):
        got, want = epoch(remote, rank), epoch(local, rank)
        assert len(got) == len(want) > 0
        assert [b.clip_ids for b in got] == [b.clip_ids for b in want]
        assert all(torch.equal(a.latents, b.latents) and torch.equal(a.cond.t5_tokens, b.cond.t5_tokens)
                   for a, b in zip(got, want))


def _upload(s3: dict, folder: Path, key: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=s3["endpoint"])
    for f in folder.rglob("*"):
        if f.is_file():
            client.upload_file(str(f), "features", f"{key}/{f.relative_to(folder).as_posix()}")


def test_checkpoints_on_s3_resolve_fetch_and_load(s3_data: dict, tiny_dir: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A run folder on S3: the latest checkpoint by step (the resumable one when asked), fetched once into the
    cache without the optimizer state for a model consumer, with it for resume; the weights load as saved."""
    from helpers.checkpoints import tiny_checkpoint
    from safetensors.torch import load_file

    from fdreamer.checkpoint import CheckpointError, load_model, resolve_checkpoint
    from training import checkpointing

    monkeypatch.setenv("FDREAMER_CACHE", str(tmp_path / "cache"))
    local = {step: tiny_checkpoint(tmp_path / f"checkpoint_step_{step:08d}", tiny_dir, seed=step, meta={"step": step})
             for step in (2, 10, 4)}
    (local[4] / "trainer_state.json").write_text(json.dumps({"step": 4, "mlflow_run_id": "abc"}))
    torch.save({"state": {}}, local[4] / "optimizer.pt")
    for step, folder in local.items():
        _upload(s3_data, folder, f"runs/r1/{folder.name}")
    run, endpoint = "s3://features/runs/r1", s3_data["endpoint"]

    path, run_id = resolve_checkpoint(run, s3_endpoint=endpoint)
    assert path == tmp_path / "cache" / "s3" / "features/runs/r1/checkpoint_step_00000010" and run_id is None
    got, want = load_file(str(path / "model.safetensors")), load_file(str(local[10] / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert load_model(path).meta["step"] == 10

    resumable = checkpointing.latest_resumable(run, endpoint)
    assert resumable == "s3://features/runs/r1/checkpoint_step_00000004"
    assert checkpointing.read_trainer_state(resumable, endpoint).mlflow_run_id == "abc"
    model_only = checkpointing.local_checkpoint(resumable, endpoint)
    assert (model_only / "trainer_state.json").is_file() and not (model_only / "optimizer.pt").exists()
    inode, weights_inode = model_only.stat().st_ino, (model_only / "model.safetensors").stat().st_ino
    full = checkpointing.local_checkpoint(resumable, endpoint, resume=True)
    assert full == model_only and (full / "optimizer.pt").is_file()  # the same cache folder, completed
    # completed in place: a worker reading the folder meanwhile (another rank on the node) keeps its files
    assert full.stat().st_ino == inode and (full / "model.safetensors").stat().st_ino == weights_inode
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        resolve_checkpoint("s3://features/runs/absent", s3_endpoint=endpoint)


@pytest.mark.parametrize(("override", "message"), [
    ("pretrained_unet=s3://bucket/x", "pretrained_unet='s3://bucket/x': the pretrained models are read from a local"),
    ("models_dir=s3://bucket/x", "models_dir='s3://bucket/x': the pretrained models are read from a local"),
    ("storage_path=gs://bucket/x", "storage_path='gs://bucket/x': a local or shared filesystem path or s3://"),
    ("data.log_order=true", "data.log_order appends to a local file per worker: with an s3:// storage_path give"),
])
def test_storage_options_checked_in_one_line(override: str, message: str) -> None:
    from training.launch import prepare

    cfg = load_config(TrainConfig, CONFIG, ["data.path=s3://features/sample", "storage_path=s3://bucket/runs", override])
    with pytest.raises(ValueError, match=message):
        prepare(cfg)

