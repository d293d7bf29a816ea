"""Numbers for fdreamer.data: schema round trip, manifests, dedup hashes, flow, quarantine reasons."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import av
import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fdreamer.data import dedup, flow, manifests, quarantine, schema, storage
from fdreamer.toy.sample_data import write_sample_data
from fdreamer.data.video import VideoDecodeError, probe_video, read_video, write_video


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sample")
    write_sample_data(out, 8, workers=1)
    return out


@pytest.fixture(scope="module")
def rows(sample: Path) -> list[dict]:
    return [json.loads(line) for line in (sample / "manifest.jsonl").read_text().splitlines()]


def _clip(path: str | Path) -> np.ndarray:
    return read_video(path, 8, stride=2, size=64).frames


# ------------------------------------------------------------------------------------------ schema


def _full_row(rng: np.random.Generator, t: int = 8, h: int = 16, length: int = 5) -> dict:
    row = {
        "clip_id": schema.make_clip_id("webvid", "42", 0, t, "s2"), "source": "webvid", "video_id": "42",
        "uri": "/x.mp4", "caption": "a cat", "motion_caption": "", "split": "train", "motion": "left", "fps": 6.0, "source_width": 128,
        "source_height": 96, "num_frames": t, "start_frame": 0, "content_hash": "ab", "motion_score": 0.5,
        "t5_length": length, "schema_version": schema.SCHEMA_VERSION,
    }
    tensors = {
        "latents": rng.normal(size=(4, t, h, h)), "first_latent": rng.normal(size=(4, h, h)),
        "clip_image_embed": rng.normal(size=(32,)), "clip_text_embed": rng.normal(size=(32,)),
        "clip_text_tokens": rng.normal(size=(77, 32)),
        "t5": rng.normal(size=(length, 24)), "flow": rng.normal(size=(2, t - 1, h, h)),
    }
    for name, arr in tensors.items():
        row |= schema.tensor_to_columns(name, arr.astype(np.float16))
    return row


def test_schema_round_trip_through_parquet(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows_in = [_full_row(rng, length=5), _full_row(rng, length=9)]
    pq.write_table(schema.rows_to_table(rows_in), tmp_path / "s.parquet")
    df = pd.read_parquet(tmp_path / "s.parquet")  # plain pandas, no fdreamer/Ray types needed
    assert list(df["t5_length"]) == [5, 9]
    for (_, got), want in zip(df.iterrows(), rows_in):
        lat = schema.columns_to_tensor(got, "latents")
        assert lat.shape == (4, 8, 16, 16) and lat.dtype == np.float16
        assert schema.columns_to_tensor(got, "first_latent").shape == (4, 16, 16)
        assert schema.columns_to_tensor(got, "flow").shape == (2, 7, 16, 16)
        assert schema.columns_to_tensor(got, "t5").shape == (want["t5_length"], 24)
        assert schema.columns_to_tensor(got, "clip_text_tokens").shape == (77, 32)
        assert got["split"] == "train" and got["motion"] == "left"
        np.testing.assert_array_equal(lat, schema.columns_to_tensor(want, "latents"))
    assert schema.SCHEMA_VERSION == 2
    assert pq.read_schema(tmp_path / "s.parquet").metadata[b"fdreamer.schema_version"] == b"2"


def test_schema_errors_and_clip_id() -> None:
    with pytest.raises(schema.SchemaError, match="4 dimensions"):
        schema.tensor_to_columns("latents", np.zeros((4, 8, 8), np.float16))
    with pytest.raises(schema.SchemaError, match="misses columns"):
        schema.rows_to_table([{"clip_id": "x"}])
    a = schema.make_clip_id("webvid", "7", 0, 8, "s2")
    assert a == schema.make_clip_id("webvid", "7", 0, 8, "s2") != schema.make_clip_id("webvid", "7", 16, 8, "s2")


def test_storage_atomic_local_writes(tmp_path: Path) -> None:
    fs, base = storage.resolve(str(tmp_path / "out"))
    storage.write_bytes(fs, storage.join(base, "a", "x.json"), b"{}")
    storage.write_parquet(fs, storage.join(base, "a", "part-1.parquet"), pa.table({"v": [1, 2]}))
    (tmp_path / "out" / "a" / ".part-2.parquet.tmp").write_bytes(b"partial")  # a crashed writer's leftover
    assert [Path(p).name for p in storage.list_files(fs, storage.join(base, "a"), "part-", ".parquet")] == ["part-1.parquet"]
    assert sorted(p.name for p in (tmp_path / "out" / "a").iterdir()) == [".part-2.parquet.tmp", "part-1.parquet", "x.json"]
    assert storage.list_files(fs, storage.join(base, "absent")) == []
    assert storage.read_bytes(fs, storage.join(base, "a", "x.json")) == b"{}"
    s3fs, s3base = storage.resolve("s3://bucket/some/prefix/", "http://127.0.0.1:9")
    assert s3base == "bucket/some/prefix" and type(s3fs).__name__ == "S3FileSystem"
    with pytest.raises(ValueError, match="unsupported output scheme"):
        storage.resolve("gs://b/x")


def test_null_conditions_and_summary_readers(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="null_conditions"):
        schema.read_null_conditions(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="_SUCCESS"):
        schema.read_summary(str(tmp_path))
    tensors = {"clip_text_tokens": torch.zeros(77, 32, dtype=torch.float16), "t5": torch.ones(1, 64, dtype=torch.float16),
               "clip_text_embed": torch.ones(32, dtype=torch.float16)}
    save_file(tensors, str(tmp_path / schema.NULL_CONDITIONS_FILE))
    got = schema.read_null_conditions(str(tmp_path))
    assert {k: tuple(v.shape) for k, v in got.items()} == {"clip_text_tokens": (77, 32), "t5": (1, 64), "clip_text_embed": (32,)}
    (tmp_path / "summary.json").write_text('{"written": 3}')
    assert schema.read_summary(str(tmp_path), require_success=False) == {"written": 3}
    with pytest.raises(FileNotFoundError):
        schema.read_summary(str(tmp_path))
    (tmp_path / "_SUCCESS").write_text('{"written": 3}')
    assert schema.read_summary(str(tmp_path)) == {"written": 3}
    save_file({"t5": tensors["t5"]}, str(tmp_path / schema.NULL_CONDITIONS_FILE))
    with pytest.raises(schema.SchemaError, match="missing keys"):
        schema.read_null_conditions(str(tmp_path))


def test_null_conditions_from_tiny_encoders(tiny_dir: Path) -> None:
    from pipelines import stages
    from pipelines.config import PreprocessConfig

    enc_cfg = dataclasses.asdict(PreprocessConfig(models_dir=str(tiny_dir)).resolved_encoders())
    enc = stages.load_encoders(enc_cfg)
    null = stages.null_conditions(enc)
    assert null["clip_text_tokens"].shape == (77, 32) and null["t5"].shape == (1, 64)
    assert all(t.dtype == torch.float16 for t in null.values())
    np.testing.assert_allclose(null["clip_text_tokens"].float().numpy(),
                               enc.encode_clip_text_tokens([""])[0].float().numpy(), atol=1e-2)


# --------------------------------------------------------------------------------------- manifests


def test_manifests_detect_formats(sample: Path, rows: list[dict], tmp_path: Path) -> None:
    web = manifests.read_manifest(str(sample / "webvid.csv"))
    pex = manifests.read_manifest(str(sample / "pexels.csv"))
    gen = manifests.read_manifest(str(sample / "manifest.jsonl"))
    assert len(web) + len(pex) == len(gen) == 8
    assert {r["source"] for r in web} == {"webvid"} and {r["source"] for r in pex} == {"pexels"}
    assert gen[0]["motion_caption"] == rows[0]["motion_caption"] and gen[0]["caption"] == rows[0]["caption"]
    assert [r["split"] for r in gen] == [r["split"] for r in rows] and gen[0]["motion"] == rows[0]["motion"]
    assert {r["split"] for r in web + pex} == {""}  # CSV formats carry no split
    pd.DataFrame(rows).to_parquet(tmp_path / "m.parquet")
    assert [r["uri"] for r in manifests.read_manifest(str(tmp_path / "m.parquet"))] == [r["path"] for r in rows]
    assert manifests.read_bytes(f"file://{rows[0]['path']}") == Path(rows[0]["path"]).read_bytes()


def test_manifest_errors(tmp_path: Path) -> None:
    (tmp_path / "nocap.csv").write_text("file,text\n/a.mp4,x\n")
    with pytest.raises(manifests.ManifestError, match="unknown manifest columns"):
        manifests.read_manifest(str(tmp_path / "nocap.csv"))
    (tmp_path / "gen.jsonl").write_text('{"path": "/a.mp4"}\n')
    with pytest.raises(manifests.ManifestError, match="no 'caption' column"):
        manifests.read_manifest(str(tmp_path / "gen.jsonl"))
    with pytest.raises(manifests.ManifestError, match="cannot read manifest"):
        manifests.read_manifest(str(tmp_path / "absent.csv"))
    with pytest.raises(manifests.ManifestError, match="unsupported URI scheme"):
        manifests.read_manifest("gs://bucket/m.csv")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(manifests.ManifestError, match="cannot parse"):
        manifests.read_manifest(str(tmp_path / "bad.parquet"))


# ------------------------------------------------------------------------------------------- dedup


def _remux(src: str, dst: Path) -> None:
    """Copy the video stream of ``src`` into another container without re-encoding."""
    with av.open(src) as inp, av.open(str(dst), "w", format="matroska") as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is None:
                continue
            packet.stream = stream
            out.mux(packet)


def test_exact_hash_survives_remux(rows: list[dict], tmp_path: Path) -> None:
    _remux(rows[0]["path"], tmp_path / "remux.mkv")
    assert Path(tmp_path / "remux.mkv").read_bytes() != Path(rows[0]["path"]).read_bytes()
    a, b = _clip(rows[0]["path"]), _clip(tmp_path / "remux.mkv")
    assert dedup.content_hash(a) == dedup.content_hash(b)
    assert dedup.content_hash(a) != dedup.content_hash(_clip(rows[1]["path"]))


def test_phash_near_duplicates_and_distinct_clips(rows: list[dict], tmp_path: Path) -> None:
    full = read_video(rows[0]["path"], 24).frames  # [24, 96, 128, 3]
    write_video(tmp_path / "crf35.mp4", full, 12, crf=35)
    small = np.stack([cv2.resize(f, (96, 72), interpolation=cv2.INTER_AREA) for f in full])
    write_video(tmp_path / "small.mp4", small, 12, crf=23)
    ref = dedup.perceptual_hash(_clip(rows[0]["path"]))
    assert len(ref) == 8 * dedup.PHASH_FRAMES
    for copy in ("crf35.mp4", "small.mp4"):
        d = dedup.mean_frame_distance(ref, dedup.perceptual_hash(_clip(tmp_path / copy)))
        assert d <= 4.0, (copy, d)
    # Visually different clips (given the same caption: the hash never looks at it) are far apart.
    others = [dedup.mean_frame_distance(ref, dedup.perceptual_hash(_clip(r["path"]))) for r in rows[1:]]
    assert min(others) >= 2 * dedup.DEFAULT_THRESHOLD, others
    # Band keys put the near copy in a shared bucket.
    assert set(dedup.band_keys(ref)) & set(dedup.band_keys(dedup.perceptual_hash(_clip(tmp_path / "crf35.mp4"))))


def test_resolve_duplicates_keeps_better_copy(rows: list[dict], tmp_path: Path) -> None:
    full = read_video(rows[0]["path"], 24).frames
    write_video(tmp_path / "crf35.mp4", full, 12, crf=35)
    table = []
    for cid, path, src, w in [("a", rows[0]["path"], "webvid", 128), ("b", tmp_path / "crf35.mp4", "pexels", 128),
                              ("c", rows[0]["path"], "webvid", 128), ("d", rows[1]["path"], "webvid", 128)]:
        f = _clip(path)
        table.append({"clip_id": cid, "source": src, "source_width": w, "source_height": 96,
                      "content_hash": dedup.content_hash(f), "phash": dedup.perceptual_hash(f)})
    dropped = dedup.resolve_duplicates(table)
    assert set(dropped) == {"a", "c"} and all(v[0] == "b" for v in dropped.values())
    assert dedup.better_copy({"clip_id": "x", "width": 200, "height": 100, "source": "webvid"},
                             {"clip_id": "y", "width": 100, "height": 100, "source": "pexels"})["clip_id"] == "x"
    assert dedup.better_copy({"clip_id": "y", "source": "webvid"}, {"clip_id": "z", "source": "webvid"})["clip_id"] == "y"


# -------------------------------------------------------------------------------------------- flow


def test_flow_sign_follows_motion(rows: list[dict]) -> None:
    by_motion = {r["motion"]: r for r in rows}
    fx = {m: flow.optical_flow(_clip(by_motion[m]["path"]), (16, 16)) for m in ("left", "right", "up", "down", "still")}
    assert fx["left"].shape == (2, 7, 16, 16) and fx["left"].dtype == np.float16
    assert fx["left"][0].astype(np.float32).mean() < -0.03 < 0.03 < fx["right"][0].astype(np.float32).mean()
    assert fx["up"][1].astype(np.float32).mean() < -0.02 < 0.02 < fx["down"][1].astype(np.float32).mean()
    assert flow.motion_score(fx["still"]) < 0.5 * flow.motion_score(fx["right"])
    with pytest.raises(ValueError, match="at least 2 frames"):
        flow.optical_flow(np.zeros((1, 8, 8, 3), np.uint8), (4, 4))


# -------------------------------------------------------------------------------------- quarantine


def plant_bad_files(good: str, out: Path) -> dict[str, Path]:
    """One planted file per quarantine reason that a file can show (decode_timeout is simulated)."""
    data = Path(good).read_bytes()
    out.mkdir(parents=True, exist_ok=True)
    files = {"missing": out / "missing.mp4", "zero_byte": out / "empty.mp4", "not_a_video": out / "text.mp4",
             "corrupt": out / "corrupt.mp4", "too_short": out / "short.mp4", "too_small": out / "tiny.mp4"}
    files["zero_byte"].write_bytes(b"")
    files["not_a_video"].write_bytes(b"<html>not a video</html>" * 20)
    files["corrupt"].write_bytes(data[:3000] + bytes(len(data) - 3000))
    frames = read_video(good, 24).frames
    write_video(files["too_short"], frames[:4], 12)
    write_video(files["too_small"], np.stack([cv2.resize(f, (32, 24)) for f in frames]), 12)
    return files


def _reason(path: Path, min_side: int = 48) -> str | None:
    try:
        quarantine.check_size(probe_video(path), min_side)
        read_video(path, 8, stride=2, size=64)
    except VideoDecodeError as exc:
        return quarantine.classify(exc, min_side)
    return None


def test_every_quarantine_reason(rows: list[dict], tmp_path: Path) -> None:
    files = plant_bad_files(rows[0]["path"], tmp_path)
    assert {reason: _reason(p) for reason, p in files.items()} == {r: r for r in files}
    assert _reason(Path(rows[0]["path"])) is None
    assert quarantine.classify(quarantine.DecodeTimeoutError("took 31 s")) == "decode_timeout"
    assert quarantine.classify(FileNotFoundError("s3://b/k")) == "missing"
    assert quarantine.classify(probe_video(files["too_small"]), 48) == "too_small"
    assert set(quarantine.REASONS) == set(files) | {"decode_timeout"}


# ------------------------------------------------------------------------------- pass-1 hash cache


def test_hash_cache_round_trip_skips_transient(rows: list[dict], tmp_path: Path) -> None:
    from pipelines import job, stages

    profile = {"num_frames": 8, "fps": None, "stride": 2, "size": 64, "clips_per_video": 1, "min_side": 48,
               "decode_timeout_s": 0, "tag": "s2-64"}
    recs = [r for m in ("manifest.jsonl",) for r in manifests.read_manifest(str(Path(rows[0]["path"]).parents[1] / m))][:2]
    recs.append(dict(recs[0], uri=str(tmp_path / "absent.mp4"), video_id="absent"))
    items = [dict(r, record_key=job.record_key(dict(r), profile)) for r in recs]
    assert len({it["record_key"] for it in items}) == 3
    assert job.record_key(dict(recs[0]), profile) != job.record_key(dict(recs[0]), profile | {"size": 32})
    out = stages.hash_and_cache(pa.Table.from_pylist(items), profile, str(tmp_path / "out"))
    assert out.column("status").to_pylist() == ["ok", "ok", "quarantined"]
    assert out.column("split").to_pylist()[:2] == [r["split"] for r in rows[:2]]
    cached = stages.read_hash_cache(str(tmp_path / "out"), None, {it["record_key"] for it in items})
    assert set(cached) == {items[0]["record_key"], items[1]["record_key"]}  # "missing" is retried next time
    assert cached[items[0]["record_key"]][0]["content_hash"] == out.column("content_hash")[0].as_py()
    # A second copy of the same block (a retried task) does not double the rows.
    stages.hash_and_cache(pa.Table.from_pylist(items[:1]), profile, str(tmp_path / "out"))
    again = stages.read_hash_cache(str(tmp_path / "out"), None, {items[0]["record_key"]})
    assert len(again[items[0]["record_key"]]) == 1
