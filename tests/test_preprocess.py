"""End to end: the Ray Data preprocessing job on a real local Ray cluster (``ray start --head``).

24 sample clips + planted duplicates (a remux, a CRF-35 re-encode, a downscaled copy) + one planted
bad file per quarantine reason go through ``pipelines/preprocess.py`` as a subprocess connected to
the session's head node (``ray_head`` fixture, ``tests/helpers/ray_cluster.py``: ``ray start --head
--block``, stopped by terminating that process, so no other Ray cluster on the machine is touched).
Then a rerun must resume without new rows and without decoding again; S3 in and out via a moto
server; the summary logged to a real MLflow server. ``ray job submit`` of this entry point (the driver
on the cluster, no ``--ray_address``) is the main job's step 4 (tests/test_e2e.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from helpers.datasets import planted_dataset
from helpers.ray_cluster import free_port, subprocess_env
from helpers.worker_kill import kill_job_when, write_task_pids

from fdreamer.data import schema
from fdreamer.data.manifests import read_manifest
from fdreamer.data.splits import assign_split

REPO = Path(__file__).resolve().parents[1]
NUM_CLIPS = 24
TINY_HELDOUT_FRACTION = yaml.safe_load((REPO / "pipelines" / "configs" / "tiny.yaml").read_text())["heldout_fraction"]
BAD = ("missing", "zero_byte", "not_a_video", "corrupt", "too_short", "too_small")


def _env() -> dict[str, str]:
    return subprocess_env()


@pytest.fixture(scope="module")
def cluster(ray_head: dict[str, str]) -> str:
    """The GCS address of the session's Ray head (``ray_head`` in conftest)."""
    return ray_head["address"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return planted_dataset(tmp_path_factory.mktemp("pp"), NUM_CLIPS, BAD)


@pytest.fixture(scope="module")
def encoders(tiny_dir: Path) -> object:
    """The job's frozen encoders (tiny models), loaded in the test process for reference encodings."""
    import dataclasses

    from pipelines import stages
    from pipelines.config import PreprocessConfig

    return stages.load_encoders(dataclasses.asdict(PreprocessConfig(models_dir=str(tiny_dir)).resolved_encoders()))


def _t5_of(enc: object, text: str) -> np.ndarray:
    """The tiny T5 encoding ``[L, D]`` (float32, unpadded) of one text."""
    return enc.encode_t5_unpadded([text])[0].float().numpy()


def _job_cmd(address: str, inputs: list[str], models: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "pipelines" / "preprocess.py"), "--config", str(REPO / "pipelines/configs/tiny.yaml"),
            f"--inputs={json.dumps(inputs)}", f"--output={out}", f"--models_dir={models}", f"--ray_address={address}",
            *extra]


def _run_job(address: str, dataset: dict, models: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = _job_cmd(address, dataset["inputs"], models, out, *extra)
    return subprocess.run(cmd, check=False, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def first_run(cluster: str, dataset: dict, tiny_dir: Path) -> dict:
    out = dataset["root"] / "out"
    started = time.perf_counter()
    proc = _run_job(cluster, dataset, tiny_dir, out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"out": out, "proc": proc, "seconds": time.perf_counter() - started}


def test_counts_conserve_and_success_written_last(first_run: dict, dataset: dict) -> None:
    out = first_run["out"]
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads((out / "_SUCCESS").read_text()) == summary
    assert summary["inputs"] == summary["clips"] == dataset["n_in"]
    assert summary["written"] + summary["duplicates"] + summary["quarantined"] == dataset["n_in"]
    assert summary["written"] == NUM_CLIPS and summary["rows_in_shards"] == NUM_CLIPS
    assert summary["bytes_per_clip_by_column"]["latents"] > 0
    assert json.loads(first_run["proc"].stdout[first_run["proc"].stdout.index("{"):]) == summary
    assert schema.read_summary(str(out)) == summary
    assert not list((out / "shards").glob(".*tmp"))
    # Every input ends in exactly one place: a shard row, the duplicates table or the quarantine table.
    inputs = [r["uri"] for m in dataset["inputs"] for r in read_manifest(m)]
    placed = (list(pd.read_parquet(out / "shards")["uri"]) + list(pd.read_parquet(out / "duplicates.parquet")["uri"])
              + list(pd.read_parquet(out / "quarantine.parquet")["uri"]))
    assert sorted(placed) == sorted(inputs) and len(set(inputs)) == len(inputs)
    assert summary["records_hashed"] == dataset["n_in"] and summary["stages"]["encode"]["clips"] == NUM_CLIPS


def test_planted_duplicates_caught(first_run: dict, dataset: dict) -> None:
    dups = pd.read_parquet(first_run["out"] / "duplicates.parquet")
    assert len(dups) == 3
    shards = pd.concat(pd.read_parquet(f) for f in sorted((first_run["out"] / "shards").glob("part-*.parquet")))
    uri_of = dict(zip(shards["clip_id"], shards["uri"]))
    pairs = {frozenset((d.uri, uri_of[d.kept_clip_id])): d.kind for d in dups.itertuples()}
    planted = dataset["planted"]
    assert pairs == {frozenset(map(str, planted["remux"])): "exact", frozenset(map(str, planted["crf35"])): "near",
                     frozenset(map(str, planted["small"])): "near"}
    # The downscaled copy loses to its full-size original.
    assert str(planted["small"][0]) in set(dups["uri"])
    # No caption is lost: each dropped copy keeps its own in duplicates.parquet, and the kept row of the
    # exact pair (the remux) lists both captions, its own first; a kept clip without exact copies has one.
    captions = {r["uri"]: r["caption"] for m in dataset["inputs"] for r in read_manifest(m)}
    assert dict(zip(dups["uri"], dups["caption"])) == {u: captions[u] for u in dups["uri"]}
    pair = [str(p) for p in planted["remux"]]
    kept = shards[shards["uri"].isin(pair)]
    assert len(kept) == 1 and list(kept.iloc[0]["captions"]) == [kept.iloc[0]["caption"], *(
        captions[u] for u in pair if u != kept.iloc[0]["uri"])]
    others = shards[~shards["uri"].isin(pair)]
    assert [list(c) for c in others["captions"]] == [[c] for c in others["caption"]]


def test_bad_files_quarantined_with_reasons(first_run: dict, dataset: dict) -> None:
    q = pd.read_parquet(first_run["out"] / "quarantine.parquet")
    assert dict(zip(q["uri"], q["reason"])) == {str(p): r for r, p in dataset["bad"].items()}
    assert all(q["detail"].str.len() > 0)


def test_outputs_decode_to_right_shapes(first_run: dict) -> None:
    df = pd.concat(pd.read_parquet(f) for f in sorted((first_run["out"] / "shards").glob("part-*.parquet")))
    assert df["clip_id"].is_unique and set(df["schema_version"]) == {schema.SCHEMA_VERSION}
    for _, row in df.iterrows():
        lat = schema.columns_to_tensor(row, "latents")
        assert lat.shape == (4, 8, 16, 16) and lat.dtype == np.float16 and np.isfinite(lat).all()
        np.testing.assert_array_equal(schema.columns_to_tensor(row, "first_latent"), lat[:, 0])
        assert schema.columns_to_tensor(row, "flow").shape == (2, 7, 16, 16)
        tokens = schema.columns_to_tensor(row, "clip_text_tokens")  # SD text encoder, padded to 77
        assert tokens.shape == (77, 32) and tokens.dtype == np.float16 and np.isfinite(tokens).all()
        t5 = schema.columns_to_tensor(row, "t5")
        assert t5.shape[0] == row["t5_length"] > 0 and t5.dtype == np.float16
        p = schema.columns_to_tensor(row, "clip_image_embed").shape
        assert p == schema.columns_to_tensor(row, "clip_text_embed").shape and len(p) == 1
        assert row["num_frames"] == 8 and row["content_hash"] and row["motion_score"] >= 0
        assert row["motion"] == ""  # CSV manifests carry no split/motion: the split is assigned by video
        assert row["split"] == assign_split("", row["source"], row["video_id"], TINY_HELDOUT_FRACTION)
    # Different captions give different token states; the padded tail is still the caption's.
    a, b = (schema.columns_to_tensor(df.iloc[i], "clip_text_tokens") for i in (0, 1))
    assert not np.array_equal(a, b)


def test_null_conditions_written_once(first_run: dict) -> None:
    out = first_run["out"]
    null = schema.read_null_conditions(str(out))
    assert set(null) == set(schema.NULL_CONDITION_KEYS)
    assert all(t.dtype == torch.float16 and torch.isfinite(t).all() for t in null.values())
    assert null["clip_text_tokens"].shape == (77, 32)  # padded like the column
    assert null["t5"].ndim == 2 and null["t5"].shape[0] == 1 and null["t5"].shape[1] == 64  # "" -> EOS only, unpadded
    row = pd.read_parquet(out / "shards").iloc[0]
    assert tuple(null["clip_text_embed"].shape) == tuple(row["clip_text_embed_shape"])
    # Not any caption's encoding.
    assert not np.array_equal(null["clip_text_tokens"].numpy(), schema.columns_to_tensor(row, "clip_text_tokens"))
    with pytest.raises(FileNotFoundError, match="null_conditions"):
        schema.read_null_conditions(str(out / "shards"))


def test_rerun_resumes_without_duplicate_rows(cluster: str, first_run: dict, dataset: dict, tiny_dir: Path) -> None:
    out = first_run["out"]
    before = sorted(p.name for p in (out / "shards").glob("part-*.parquet"))
    # A crashed writer's leftover temp file must be ignored.
    (out / "shards" / ".part-crashed.parquet.tmp").write_bytes(b"partial")
    proc = _run_job(cluster, dataset, tiny_dir, out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "_SUCCESS").read_text())
    assert summary["written"] == 0 and summary["already_done"] == NUM_CLIPS
    # Pass 1 came from the _hashes/ cache: only the missing file (a transient reason) was tried again.
    assert summary["records_hashed"] == 1 and summary["quarantined_by_reason"] == first_run_reasons(out)
    assert summary["already_done"] + summary["duplicates"] + summary["quarantined"] == dataset["n_in"]
    assert sorted(p.name for p in (out / "shards").glob("part-*.parquet")) == before
    assert summary["rows_in_shards"] == NUM_CLIPS
    # every shard recorded by the first run's ledger: no footer read again, no ledger file added
    assert summary["ledger"] == {"shards": len(before), "recovered": 0}
    assert len(list((out / "_ledger").glob("run-*.parquet"))) == 1 and not list((out / "_ledger").glob("recovered-*"))


def first_run_reasons(out: Path) -> dict[str, int]:
    return dict(pd.read_parquet(out / "quarantine.parquet")["reason"].value_counts())


def test_bad_manifest_fails_fast(tmp_path: Path, tiny_dir: Path) -> None:
    (tmp_path / "m.csv").write_text("file,text\n/a.mp4,x\n")
    cmd = [sys.executable, str(REPO / "pipelines" / "preprocess.py"), f"--inputs=[{tmp_path / 'm.csv'}]",
           f"--output={tmp_path / 'out'}", f"--models_dir={tiny_dir}", "--ray_address=127.0.0.1:1"]
    proc = subprocess.run(cmd, check=False, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown manifest columns" in proc.stderr
    cmd[-3] = "--output=gs://bucket/out"
    proc = subprocess.run(cmd, check=False, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unsupported output scheme" in proc.stderr


def _shard_ids(out: Path) -> list[str]:
    return [c for f in sorted((out / "shards").glob("part-*.parquet")) for c in pd.read_parquet(f, columns=["clip_id"])["clip_id"]]


def test_a_killed_write_task_is_retried_without_extra_rows(cluster: str, dataset: dict, tiny_dir: Path) -> None:
    """The worker process of a shard-writing task SIGKILLed once a first shard is committed: Ray retries the
    task (the same rows, so the same shard name: the file is replaced), and the job completes with every
    clip exactly once."""
    import os
    import signal

    out = dataset["root"] / "retried"
    cmd = _job_cmd(cluster, dataset["inputs"], tiny_dir, out, "--shard_target_bytes=100000")
    proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed: list[int] = []
    try:
        deadline = time.monotonic() + 180
        while not killed and time.monotonic() < deadline and proc.poll() is None:
            if any((out / "shards").glob("part-*.parquet")):
                for pid in write_task_pids():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.01)
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed, "no write task was running once the first shard existed"
    assert proc.returncode == 0, err[-4000:]
    summary = json.loads((out / "_SUCCESS").read_text())
    ids = _shard_ids(out)
    assert len(ids) == len(set(ids)) == NUM_CLIPS == summary["written"] == summary["rows_in_shards"]
    assert summary["ledger"]["shards"] == len(list((out / "shards").glob("part-*.parquet")))


def test_sigkill_at_three_points_then_resume(cluster: str, dataset: dict, tiny_dir: Path, first_run: dict) -> None:
    """The driver SIGKILLed during pass 1, then (rerun) during the dedup plan, then (rerun) during the shard
    writes; the last rerun completes: the same output as the uninterrupted run, every clip exactly once."""
    out = dataset["root"] / "killed"
    # One-row shards and one clip at a time through every stage, so each kill lands mid-stage (tasks of
    # the dead driver may still finish a few files: those are complete and count as done).
    cmd = _job_cmd(cluster, dataset["inputs"], tiny_dir, out, "--shard_target_bytes=100000",
                   "--stages.hash.concurrency=1", "--stages.hash.batch_size=1", "--stages.decode.concurrency=1",
                   "--stages.decode.batch_size=1", "--stages.encode.batch_size=1")
    hashes, shards = out / "_hashes", out / "shards"
    killed, err = kill_job_when(cmd, lambda _: any(hashes.glob("part-*.parquet")))  # 1. pass 1 under way
    assert killed and "plan stage pass1 done" not in err, err[-3000:]
    killed, err = kill_job_when(cmd, lambda e: "plan stage ids done" in e)  # 2. pass 1 done, duplicates being resolved
    assert killed and not any(shards.glob("part-*.parquet")), err[-3000:]
    killed, err = kill_job_when(cmd, lambda _: any(shards.glob("part-*.parquet")))  # 3. shards being written
    assert killed, err[-3000:]
    assert not (out / "_SUCCESS").exists()
    partial = _shard_ids(out)
    assert 0 < len(partial) < NUM_CLIPS
    rerun = _run_job(cluster, dataset, tiny_dir, out)  # the job's own batch and shard sizes: they may differ
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    summary = json.loads((out / "_SUCCESS").read_text())
    ids = _shard_ids(out)
    assert len(ids) == len(set(ids)) == NUM_CLIPS  # no clip lost, none written twice
    assert summary["already_done"] == len(partial) and summary["written"] == NUM_CLIPS - len(partial)
    # each input in exactly one place: a shard row, duplicates.parquet or quarantine.parquet
    inputs = [r["uri"] for m in dataset["inputs"] for r in read_manifest(m)]
    placed = (list(pd.read_parquet(out / "shards", columns=["uri"])["uri"])
              + list(pd.read_parquet(out / "duplicates.parquet")["uri"]) + list(pd.read_parquet(out / "quarantine.parquet")["uri"]))
    assert sorted(placed) == sorted(inputs)
    # The same final output as the uninterrupted run: same ids, same side tables, same tensors.
    assert sorted(ids) == sorted(_shard_ids(first_run["out"]))
    for table in ("duplicates.parquet", "quarantine.parquet"):
        got, want = (pd.read_parquet(d / table).sort_values("clip_id").reset_index(drop=True)
                     for d in (out, first_run["out"]))
        pd.testing.assert_frame_equal(got.drop(columns=["detail"], errors="ignore"),
                                      want.drop(columns=["detail"], errors="ignore"))
    a = pd.read_parquet(out / "shards").set_index("clip_id").sort_index()
    b = pd.read_parquet(first_run["out"] / "shards").set_index("clip_id").sort_index()
    assert list(a["content_hash"]) == list(b["content_hash"]) and list(a["caption"]) == list(b["caption"])
    for cid in a.index[:3]:
        np.testing.assert_allclose(schema.columns_to_tensor(a.loc[cid], "latents").astype(np.float32),
                                   schema.columns_to_tensor(b.loc[cid], "latents").astype(np.float32), atol=2e-2)
    # The killed run had finished pass 1 (shards existed): the rerun decoded only the missing file again.
    assert summary["records_hashed"] == 1
    # The killed run wrote shards but no ledger file: the rerun read those footers and recorded them.
    shards = len(list((out / "shards").glob("part-*.parquet")))
    assert summary["ledger"]["shards"] == shards and summary["ledger"]["recovered"] >= 1
    assert summary["rows_in_shards"] == NUM_CLIPS


def test_s3_inputs_and_output_via_moto(cluster: str, dataset: dict, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                       mlflow_server: str, encoders: object) -> None:
    """Manifests and clips in an S3 bucket, Parquet written to another (moto server on 127.0.0.1), with
    ``--t5_caption=motion_caption``.

    Clips are read and shards written by the workers; the summary goes to a real MLflow server. t5
    encodes each row's motion caption; a JSONL row without one and a WebVid CSV row fall back to caption
    and are counted; CLIP stays on caption. A rerun on the same S3 output resumes (lists the shards there)
    and writes nothing; a rerun with the default t5_caption exits 2 before touching it (no T5 of the
    other text is reused).
    """
    import csv
    import io

    import boto3
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs
    from mlflow.tracking import MlflowClient
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for k, v in _env().items():
            if k.startswith("AWS_"):
                monkeypatch.setenv(k, v)
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="videos")
        s3.create_bucket(Bucket="features")
        rows = [json.loads(x) for x in (dataset["root"] / "sample" / "manifest.jsonl").read_text().splitlines()][:4]
        lines = []
        for r in rows:
            key = f"clips/{Path(r['path']).name}"
            s3.upload_file(r["path"], "videos", key)
            lines.append({"path": f"s3://videos/{key}", "caption": r["caption"], "clip_id": r["clip_id"],
                          "split": r["split"], "motion": r["motion"], "motion_caption": r["motion_caption"]})
        del lines[2]["motion_caption"]  # falls back to caption
        webvid = lines.pop()  # a WebVid CSV row: no motion caption column, falls back too
        lines.append({"path": "s3://videos/clips/absent.mp4", "caption": "gone"})
        s3.put_object(Bucket="videos", Key="m.jsonl", Body="".join(json.dumps(x) + "\n" for x in lines).encode())
        text = io.StringIO()
        csv.writer(text).writerows([["videoid", "contentUrl", "name"], ["w3", webvid["path"], webvid["caption"]]])
        s3.put_object(Bucket="videos", Key="w.csv", Body=text.getvalue().encode())
        out = "s3://features/tiny/run1"
        manifests = ["s3://videos/m.jsonl", "s3://videos/w.csv"]
        cmd = _job_cmd(cluster, manifests, tiny_dir, out, f"--s3_endpoint={endpoint}", "--t5_caption=motion_caption",
                       f"--mlflow_tracking_uri={mlflow_server}", "--mlflow_experiment=preprocess-s3-test")
        proc = subprocess.run(cmd, check=False, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "MLflow logging failed" not in proc.stderr
        summary = schema.read_summary(out, endpoint)
        assert summary["written"] == 4 and summary["quarantined_by_reason"] == {"missing": 1}
        assert summary["t5_caption"] == "motion_caption" and summary["t5_caption_fallbacks"] == 2
        assert "2 of 4 written clips have no motion_caption" in proc.stderr
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket="features")["Contents"]}
        assert {f"tiny/run1/{n}" for n in ("_SUCCESS", "summary.json", "quarantine.parquet", "duplicates.parquet",
                                           schema.NULL_CONDITIONS_FILE)} <= keys
        assert not any(k.rsplit("/", 1)[-1].startswith(".") for k in keys)  # no temporaries on S3
        # Read back with plain pyarrow from S3.
        fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1")
        shards = schema.shard_paths(out, endpoint)
        assert shards and all(p.startswith("features/tiny/run1/shards/part-") for p in shards)
        table = pads.dataset(shards, filesystem=fs, format="parquet").to_table()
        assert table.num_rows == 4 and sorted(table.column("uri").to_pylist()) == sorted(x["path"] for x in lines[:3] + [webvid])
        csv_row = next(r for r in table.to_pylist() if r["source"] == "webvid")  # CSV: no split, one assigned
        assert sorted(table.column("split").to_pylist()) == sorted(
            [r["split"] for r in rows[:3]] + [assign_split("", "webvid", csv_row["video_id"], TINY_HELDOUT_FRACTION)])
        assert table.schema.metadata[b"fdreamer.schema_version"] == str(schema.SCHEMA_VERSION).encode()
        assert table.schema.metadata[schema.T5_CAPTION_META] == b"motion_caption"
        motion = {x["path"]: x["motion_caption"] for x in lines[:2]}
        df = table.to_pandas().set_index("uri")
        assert dict(df["motion_caption"]) == {u: motion.get(u, "") for u in df.index}
        for uri, row in df.iterrows():
            t5 = schema.columns_to_tensor(row, "t5").astype(np.float32)
            cap = _t5_of(encoders, row["caption"])
            if uri in motion:  # the motion caption's tokens, not the caption's
                np.testing.assert_allclose(t5, _t5_of(encoders, motion[uri]), atol=1e-3, rtol=1e-3)
                assert len(t5) < len(cap) and np.abs(t5 - cap[: len(t5)]).max() > 0.5
            else:  # fell back
                np.testing.assert_allclose(t5, cap, atol=1e-3, rtol=1e-3)
            clip = encoders.encode_clip_text_tokens([row["caption"]])[0].float().numpy()  # CLIP: the full caption
            np.testing.assert_allclose(schema.columns_to_tensor(row, "clip_text_tokens").astype(np.float32), clip,
                                       atol=1e-3, rtol=1e-3)
        assert schema.read_null_conditions(out, endpoint)["clip_text_tokens"].shape == (77, 32)
        # The summary was logged to MLflow.
        client = MlflowClient(tracking_uri=mlflow_server)
        exp = client.get_experiment_by_name("preprocess-s3-test")
        runs = client.search_runs([exp.experiment_id])
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        metrics = runs[0].data.metrics
        assert metrics["written"] == 4 and metrics["duplicates"] == 0 and metrics["quarantined"] == 1
        assert metrics["quarantined.missing"] == 1 and metrics["stage.encode.clips"] == 4
        assert runs[0].data.params["output"] == out
        # Resume on S3: the completed shards are listed there and nothing is written again.
        rerun_cmd = _job_cmd(cluster, manifests, tiny_dir, out, f"--s3_endpoint={endpoint}")
        rerun = subprocess.run([*rerun_cmd, "--t5_caption=motion_caption"], check=False, env=_env(), cwd=REPO,
                               capture_output=True, text=True, timeout=240)
        assert rerun.returncode == 0, rerun.stderr[-4000:]
        again = schema.read_summary(out, endpoint)
        assert again["written"] == 0 and again["already_done"] == 4 and again["records_hashed"] == 1
        assert schema.shard_paths(out, endpoint) == shards
        # The default t5_caption on that output: one line, exit 2, nothing touched.
        other = subprocess.run(rerun_cmd, check=False, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=240)
        assert other.returncode == 2 and "Traceback" not in other.stderr, other.stderr[-4000:]
        assert f"holds {len(shards)} shard(s) with t5_caption=motion_caption" in other.stderr
        assert "this run's t5_caption=caption" in other.stderr
        assert schema.shard_paths(out, endpoint) == shards and schema.read_summary(out, endpoint) == again
    finally:
        server.stop()


def test_preprocessed_sample_fixture(preprocessed_sample: dict) -> None:
    """The session fixture other test modules (training) use: 32 clips, both splits, trained VAE."""
    out = preprocessed_sample["output"]
    summary = preprocessed_sample["summary"]
    assert summary == schema.read_summary(str(out)) and summary["inputs"] == 32
    assert summary["written"] + summary["duplicates"] + summary["quarantined"] == 32 and summary["written"] >= 30
    df = pd.read_parquet(out / "shards")
    assert set(df["split"]) == {"train", "heldout"} and set(df["motion"]) >= {"left", "right", "still"}
    assert (preprocessed_sample["models"] / "vae").is_dir() and (preprocessed_sample["sample"] / "manifest.jsonl").is_file()
    assert set(schema.read_null_conditions(str(out))) == set(schema.NULL_CONDITION_KEYS)


def test_t5_caption_default_encodes_caption(first_run: dict, encoders: object) -> None:
    """Default: t5 is the tiny T5 of the full caption, nothing falls back, the shards say so."""
    out = first_run["out"]
    summary = schema.read_summary(str(out))
    assert summary["t5_caption"] == "caption" and summary["t5_caption_fallbacks"] == 0
    assert {pq.read_schema(f).metadata[schema.T5_CAPTION_META] for f in (out / "shards").glob("part-*.parquet")} == {
        b"caption"}
    for _, row in pd.read_parquet(out / "shards").head(4).iterrows():
        t5 = schema.columns_to_tensor(row, "t5").astype(np.float32)
        np.testing.assert_allclose(t5, _t5_of(encoders, row["caption"]), atol=1e-3, rtol=1e-3)
