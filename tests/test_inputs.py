"""Inputs as users hold them, without Ray: held-out assignment, split rules, video2dataset layouts, member uris."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from fdreamer.data import v2d
from fdreamer.data.inputs import check_input, expand_inputs, read_input
from fdreamer.data.manifests import ManifestError
from fdreamer.data.sources import SourceError, member_uri, open_source, parse_member
from fdreamer.data.splits import HELDOUT, TRAIN, assign_split, heldout_score
from fdreamer.toy.web_data import write_video2dataset, write_web_data, write_web_manifests
from training.rows import SplitRule, row_filter, row_mask, split_counts, train_rule


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("web")
    write_web_data(root, num_videos=6)
    write_web_manifests(root)
    return root


def test_heldout_assignment_is_by_video_deterministic_and_nested() -> None:
    ids = [str(i) for i in range(4000)]
    small = {i for i in ids if assign_split("", "webvid", i, 0.05) == HELDOUT}
    large = {i for i in ids if assign_split("", "webvid", i, 0.2) == HELDOUT}
    assert 0.04 < len(small) / len(ids) < 0.06 and 0.18 < len(large) / len(ids) < 0.22
    assert small <= large  # a larger fraction only moves videos to heldout
    assert {assign_split("", "webvid", i, 0.2) for i in ids} == {HELDOUT, TRAIN}
    assert heldout_score("webvid", "7") == heldout_score("webvid", "7") != heldout_score("pexels", "7")
    assert assign_split("val", "webvid", "1", 0.99) == "val"  # a manifest's own split is kept
    assert assign_split("", "webvid", "1", 0.0) == TRAIN
    with pytest.raises(ValueError, match=r"heldout_fraction must be in \[0, 1\)"):
        assign_split("", "webvid", "1", 1.0)


def test_split_rules_select_the_same_rows_as_mask_and_filter(tmp_path: Path) -> None:
    table = pa.table({"split": ["train", "heldout", "", None, "val"], "num_frames": [8] * 5,
                      "motion_score": [1.0] * 5, "schema_version": [3] * 5})
    data = SimpleNamespace(min_motion_score=None, max_motion_score=None, num_frames=None, split=None,
                           heldout_split="heldout")
    pq.write_table(table, tmp_path / "t.parquet")
    def both(rule: object) -> list[int]:
        mask = row_mask(table, data, rule).to_pylist()
        scanned = pads.dataset(tmp_path / "t.parquet").to_table(filter=row_filter(data, rule))
        assert scanned.num_rows == sum(mask)
        return [i for i, m in enumerate(mask) if m]

    assert both(train_rule(data)) == [0, 2, 3, 4]  # everything not held out: empty and null splits included
    assert both(SplitRule(keep="heldout")) == [1] and both("train") == [0] and both(None) == [0, 1, 2, 3, 4]
    assert train_rule(SimpleNamespace(split="train", heldout_split="heldout")) == SplitRule(keep="train")
    assert train_rule(data).describe() == "split != 'heldout'"
    assert split_counts(pafs.LocalFileSystem(), [str(tmp_path / "t.parquet")]) == {
        "''": 1, "'heldout'": 1, "'train'": 1, "'val'": 1, "null": 1}


def test_member_uris_round_trip_and_read_one_member(web: Path, tmp_path: Path) -> None:
    uri = member_uri("s3://b/00000.tar", "000000001.mp4", 1536, 99)
    assert parse_member(uri) == ("s3://b/00000.tar", "000000001.mp4", 1536, 99)
    assert parse_member("/data/a#b.mp4") is None and parse_member("https://x/v.mp4") is None
    with pytest.raises(SourceError, match="reserve"):
        member_uri("/s.tar", "a#b.mp4", 0, 1)
    shards = write_video2dataset(web, tmp_path / "wds")
    records = v2d.read_tar(str(shards[0]))
    with tarfile.open(shards[0]) as tar:
        names = tar.getnames()
        first = tar.extractfile(names[1]).read()  # json, mp4, txt per sample
    assert names[:3] == ["000000000.json", "000000000.mp4", "000000000.txt"]
    assert open_source(records[0]["uri"]) == first
    truncated = member_uri(str(shards[0]), "000000000.mp4", 10**9, 10)
    with pytest.raises(OSError, match="truncated shard"):
        open_source(truncated)
    with pytest.raises(SourceError, match="unsupported URI scheme 'gs'"):
        open_source("gs://bucket/v.mp4")


@pytest.mark.parametrize("layout", ["webdataset", "files"])
def test_video2dataset_layouts_give_the_csv_records(web: Path, tmp_path: Path, layout: str) -> None:
    write_video2dataset(web, tmp_path / layout, layout=layout, samples_per_shard=4)
    csv = read_input(str(web / "webvid.csv")) + read_input(str(web / "pexels.csv"))
    shards = expand_inputs([str(tmp_path / layout)])
    assert [Path(s).suffix for s in shards] == [".tar" if layout == "webdataset" else ".parquet"] * 2
    got = [r for s in shards for r in read_input(s)]

    def identity(r: dict) -> tuple:
        return r["source"], r["video_id"], r["caption"], r["width"], r["height"], r["split"], r["kind"]

    assert sorted(map(identity, got)) == sorted(map(identity, csv))
    by_id = {(r["source"], r["video_id"]): r["uri"] for r in csv}
    for r in got:  # the same bytes as the CSV's file (a local file is decoded in place: its path)
        src = open_source(r["uri"])
        data = Path(src).read_bytes() if isinstance(src, str) else src
        assert data == Path(by_id[(r["source"], r["video_id"])]).read_bytes()
    assert {check_input(s) for s in shards} == {"webdataset" if layout == "webdataset" else "video2dataset"}
    assert check_input(str(tmp_path / layout)) == check_input(shards[0])


def test_video2dataset_failed_rows_stay_records_and_bad_shards_fail(web: Path, tmp_path: Path) -> None:
    (tmp_path / "00000").mkdir()
    pq.write_table(pa.Table.from_pylist([
        {"key": "000000000", "url": "https://x/a.mp4", "caption": "a", "status": "success", "videoid": 5},
        {"key": "000000001", "url": "https://x/b.mp4", "caption": "b", "status": "failed_to_download", "videoid": 6},
    ]), tmp_path / "00000.parquet")
    records = read_input(str(tmp_path / "00000.parquet"))
    assert [(r["video_id"], Path(r["uri"]).name) for r in records] == [("5", "000000000.mp4"), ("6", "000000001.mp4")]
    (tmp_path / "bad.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(ManifestError, match="no ustar header"):
        check_input(str(tmp_path / "bad.tar"))
    with pytest.raises(ManifestError, match="not a readable tar shard"):
        read_input(str(tmp_path / "bad.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match=r"no \*.tar or \*.parquet shards"):
        expand_inputs([str(tmp_path / "empty")])
    with pytest.raises(ManifestError, match="over http"):
        check_input("https://huggingface.invalid/shards/00000.tar")
    with tarfile.open(tmp_path / "nocap.tar", "w") as tar:
        data = json.dumps({"key": "k"}).encode()
        for name, body in (("k.json", data), ("k.mp4", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    with pytest.raises(ManifestError, match="has no caption"):
        read_input(str(tmp_path / "nocap.tar"))


def test_tar_shards_and_a_folder_of_them_on_s3(web: Path, tmp_path: Path, s3_endpoint: str) -> None:
    """A bucket of video2dataset tars: the folder listed, each tar indexed through ranged reads, and a
    member's bytes fetched with one ranged GET (moto's real S3 server)."""
    import boto3

    shards = write_video2dataset(web, tmp_path / "wds", samples_per_shard=4)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="inputs-v2d")
    for shard in shards:
        s3.upload_file(str(shard), "inputs-v2d", f"webvid/{shard.name}")
    remote = expand_inputs(["s3://inputs-v2d/webvid/"], s3_endpoint)
    assert remote == [f"s3://inputs-v2d/webvid/{s.name}" for s in shards]
    assert check_input("s3://inputs-v2d/webvid/", s3_endpoint) == "webdataset"
    local = [r for s in shards for r in read_input(str(s))]
    got = [r for s in remote for r in read_input(s, s3_endpoint)]
    assert [(r["source"], r["video_id"], r["caption"]) for r in got] == \
        [(r["source"], r["video_id"], r["caption"]) for r in local]
    assert open_source(got[-1]["uri"], s3_endpoint) == open_source(local[-1]["uri"])
