"""WebVid and Pexels as users hold them, through the real job: https links, video2dataset shards, shots, faults.

The inputs (:mod:`fdreamer.toy.web_data`): 9 multi-shot 16:9 H.264 videos (2-3 hard cuts' worth of shots
each), listed in a WebVid CSV and a Pexels CSV whose links are ``https://`` URLs of a real HTTPS server on
loopback (:class:`tests.helpers.http_faults.FaultServer`, a self-signed certificate handed to the job as
``fetch.ca_bundle``). Two WebVid rows go through the server's faults (500 twice then the file; a redirect),
and a third CSV lists broken links (404, a stalled body, a truncated body).

One preprocessing run on the shared Ray head (the tiny profile, 3 clips per video, no split given by any
manifest), then:

- every input is accounted for (shards, duplicates, quarantine; the broken links with their reasons),
  the 500-then-200 video is written, and no written clip contains a cut;
- ``tiny_stage1.yaml`` trains on it as it is (no split override) with a held-out validation loss;
- the same videos as video2dataset WebDataset tars give the same clip ids and the same tensors (the
  parquet + files layout gives the same records and bytes: ``tests/test_inputs.py``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import mlflow
import pyarrow.parquet as pq
import pytest

from fdreamer.toy.web_data import write_video2dataset, write_web_data, write_web_manifests
from helpers.datasets import preprocess_cmd
from helpers.http_faults import FaultServer
from helpers.ray_cluster import REPO, subprocess_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

SPAN = 15  # the tiny profile's clip: 8 frames, every 2nd source frame
FAULT_ARGS = ["--profile.clips_per_video=3", "--fetch.read_timeout_s=1.5", "--fetch.total_timeout_s=20",
              "--fetch.retries=2", "--fetch.backoff_s=0.05"]
TENSORS = ("latents", "first_latent", "clip_image_embed", "clip_text_tokens", "t5", "flow")


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("web")
    truth = write_web_data(root)
    from fdreamer.toy.tiny_models import make_tiny_models

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        make_tiny_models(root / "models", seed=0)
    return {"root": root, "truth": truth, "models": root / "models"}


@pytest.fixture(scope="module")
def server(web: dict):
    with FaultServer(web["root"], https=True) as s:
        yield s


def _preprocess(web: dict, ray_head: dict, inputs: list[str], out: Path, *extra: str) -> dict:
    cmd = preprocess_cmd(ray_head["address"], inputs, web["models"], out, *FAULT_ARGS, *extra)
    proc = subprocess.run(cmd, check=False, env=subprocess_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((out / "_SUCCESS").read_text())


def _shards(out: Path) -> list[dict]:
    return [r for f in sorted((out / "shards").glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()]


@pytest.fixture(scope="module")
def csv_run(web: dict, server: FaultServer, ray_head: dict) -> dict:
    root = web["root"]
    paths = write_web_manifests(root, base_url=server.url(""))
    text = paths["webvid"].read_text().splitlines()
    # two of WebVid's own rows through the server's faults: the same bytes arrive, after retries / a redirect
    text[1] = text[1].replace("/videos/", "/500x2/videos/", 1)
    text[2] = text[2].replace("/videos/", "/redirect/videos/", 1)
    paths["webvid"].write_text("\n".join(text) + "\n")
    broken = root / "broken.csv"
    names = [v["name"] for v in web["truth"]["videos"]]
    broken.write_text("videoid,contentUrl,duration,page_dir,name\n" + "".join(
        f"{9000 + i},{server.url(f'{fault}/videos/{names[i]}')},PT00H00M05S,000000_000049,broken {fault}\n"
        for i, fault in enumerate(("404", "stall", "truncate"))))
    out = root / "pre-csv"
    summary = _preprocess(web, ray_head, [str(paths["webvid"]), str(paths["pexels"]), str(broken)], out,
                          f"--fetch.ca_bundle={server.ca_file}")
    return {"summary": summary, "out": out, "webvid": paths["webvid"], "broken": broken,
            "first_urls": (text[1].split(",")[1], text[2].split(",")[1])}


def test_every_https_input_is_accounted_for_and_faults_get_their_reasons(csv_run: dict, server: FaultServer,
                                                                       web: dict) -> None:
    out, summary = csv_run["out"], csv_run["summary"]
    shards = _shards(out)
    dups = pq.read_table(out / "duplicates.parquet").to_pylist()
    quarantine = pq.read_table(out / "quarantine.parquet").to_pylist()
    inputs = [line.split(",")[1] for m in (csv_run["webvid"], csv_run["webvid"].with_name("pexels.csv"),
                                           csv_run["broken"]) for line in m.read_text().splitlines()[1:]]
    written_ids, dup_ids = {r["clip_id"] for r in shards}, {r["clip_id"] for r in dups}
    assert not written_ids & dup_ids and len(written_ids) == len(shards)
    for uri in inputs:  # each input leaves the job: as clips (written or counted duplicates), or quarantined
        places = [any(r["uri"] == uri for r in rows) for rows in (shards + dups, quarantine)]
        assert places.count(True) == 1, (uri, places)
    reasons = {r["uri"].split("/")[3]: r["reason"] for r in quarantine}
    assert reasons == {"404": "http_404", "stall": "timeout", "truncate": "truncated"}, quarantine
    assert summary["quarantined_by_reason"] == {"http_404": 1, "timeout": 1, "truncated": 1}
    retried, redirected = csv_run["first_urls"]
    assert any(r["uri"] == retried for r in shards)  # 500, 500, then the file: written
    assert server.requests["/500x2/videos/" + retried.rsplit("/", 1)[1]] >= 3
    assert any(r["uri"] == redirected for r in shards)
    assert summary["written"] == len(shards) and summary["written"] >= len(web["truth"]["videos"])


def test_no_written_clip_contains_a_cut(csv_run: dict, web: dict) -> None:
    cuts = {(v["source"], str(v["id"])): v["cuts"] for v in web["truth"]["videos"]}
    shards = _shards(csv_run["out"])
    for r in shards:
        start, end = r["start_frame"], r["start_frame"] + SPAN  # the clip's source frames [start, end)
        assert not [c for c in cuts[(r["source"], r["video_id"])] if start < c < end], r["clip_id"]
    assert any(r["start_frame"] in cuts[(r["source"], r["video_id"])] for r in shards)  # clips of later shots
    assert csv_run["summary"]["shots"]["cuts"] == sum(len(c) for c in cuts.values())
    assert csv_run["summary"]["shots"]["videos_with_cuts"] == len(cuts)


def test_tiny_stage1_trains_on_it_as_is_with_a_heldout_loss(csv_run: dict, web: dict, ray_head: dict,
                                                           mlflow_server: str, tmp_path: Path) -> None:
    shards = _shards(csv_run["out"])
    assert {r["split"] for r in shards} == {"train", "heldout"}  # assigned by video: no manifest gave one
    by_video = {}
    for r in shards:
        by_video.setdefault(r["video_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_video.values())  # every clip of a video on the same side
    cmd = [sys.executable, str(REPO / "training" / "run.py"), "--config",
           str(REPO / "training" / "configs" / "tiny_stage1.yaml"), f"--data.path={csv_run['out']}",
           f"--models_dir={web['models']}", f"--storage_path={tmp_path}", f"--ray_address={ray_head['address']}",
           "--steps=4", "--checkpoint.every=4", "--tracking.validate_every=2", f"--tracking.tracking_uri={mlflow_server}",
           "--tracking.experiment=test-web-inputs"]
    proc = subprocess.run(cmd, check=False, env=subprocess_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    summary = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{") and '"checkpoint"' in ln][-1])
    val = mlflow.tracking.MlflowClient(mlflow_server).get_metric_history(summary["mlflow_run_id"], "val_loss")
    assert sorted(m.step for m in val) == [0, 2, 4] and all(m.value > 0 for m in val)


def test_video2dataset_shards_give_the_same_clips_and_tensors(csv_run: dict, web: dict, ray_head: dict) -> None:
    """WebDataset tars (the parquet + files layout gives the same records and bytes: tests/test_inputs.py)."""
    layout = "webdataset"
    shards_dir = web["root"] / f"v2d-{layout}"
    write_video2dataset(web["root"], shards_dir, layout=layout)
    out = web["root"] / f"pre-{layout}"
    summary = _preprocess(web, ray_head, [str(shards_dir)], out)  # a folder of shards is one input
    assert summary["quarantined"] == 0
    from_csv = {r["clip_id"]: r for r in _shards(csv_run["out"])}
    from_v2d = {r["clip_id"]: r for r in _shards(out)}
    assert set(from_v2d) == set(from_csv)
    for clip_id, row in from_v2d.items():
        for name in TENSORS:
            assert row[name] == from_csv[clip_id][name], (clip_id, name)
        assert row["split"] == from_csv[clip_id]["split"]
