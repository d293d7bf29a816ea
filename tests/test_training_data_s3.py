"""The training job reads its data from S3: ``data.path: s3://bucket/prefix`` with ``s3_endpoint`` (a moto
server on 127.0.0.1), through the same pyarrow filesystem layer as the preprocessing job.

The session's preprocessed sample (32 clips) is copied to a bucket as is; every driver-side read of
``training/launch.prepare`` (shard listing, schema check, null conditions, row count, clip profile), the
held-out batch (a filtered scan) and the Ray Data read of the workers (on the session's Ray head) must
give what they give on the local folder. Checkpoints on S3 are refused with one clear line (not yet).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers.ray_cluster import REPO, free_port, subprocess_env

from fdreamer.config import load_config
from training.config import TrainConfig

CONFIG = REPO / "training" / "configs" / "tiny_stage1.yaml"


@pytest.fixture(scope="module")
def s3_data(preprocessed_sample: dict, monkeypatch_module: pytest.MonkeyPatch) -> Iterator[dict]:
    """A moto S3 server holding a copy of the preprocessed sample under ``s3://features/sample``."""
    import boto3
    from moto.server import ThreadedMotoServer

    for k, v in subprocess_env().items():
        if k.startswith("AWS_"):
            monkeypatch_module.setenv(k, v)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="features")
        root = Path(preprocessed_sample["output"])
        for f in root.rglob("*"):
            if f.is_file() and not f.name.startswith("."):
                s3.upload_file(str(f), "features", f"sample/{f.relative_to(root).as_posix()}")
        yield {"endpoint": endpoint, "uri": "s3://features/sample", "local": str(root),
               "models": str(preprocessed_sample["models"])}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as mp:
        yield mp


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


def test_ray_data_reads_the_s3_shards_on_the_cluster(s3_data: dict, ray_head: dict, tmp_path: Path) -> None:
    """The dataset the Ray Train workers consume, read by Ray Data tasks on the session's head (whose
    workers have the test's AWS credentials): the same clip ids as the local folder."""
    code = f"""
import json, ray
from fdreamer.config import load_config
from training.config import TrainConfig
from training import data as train_data
ray.init(address={ray_head['address']!r}, log_to_driver=False)
ids = {{}}
for name, path in (("s3", {s3_data['uri']!r}), ("local", {s3_data['local']!r})):
    cfg = load_config(TrainConfig, {str(CONFIG)!r}, ["data.path=" + path, "s3_endpoint={s3_data['endpoint']}",
                                                     "data.materialize=false"])
    ids[name] = sorted(r["clip_id"] for r in train_data.dataset(cfg).select_columns(["clip_id"]).take_all())
print(json.dumps(ids))
"""
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ids = json.loads(proc.stdout.strip().splitlines()[-1])
    assert ids["s3"] == ids["local"] and len(ids["s3"]) > 0


@pytest.mark.parametrize("key", ["storage_path", "init_from", "pretrained_unet", "models_dir"])
def test_checkpoints_on_s3_are_refused_in_one_line(key: str, tmp_path: Path) -> None:
    from training.launch import prepare

    cfg = load_config(TrainConfig, CONFIG, ["data.path=s3://features/sample", f"{key}=s3://bucket/x"])
    with pytest.raises(ValueError, match=f"{key}='s3://bucket/x': checkpoints and models .* only data.path"):
        prepare(cfg)
