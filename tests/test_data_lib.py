"""Numbers for fdreamer.data: schema round trip, manifests, dedup hashes, flow, quarantine reasons."""

from __future__ import annotations

import dataclasses
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
from fdreamer.data.sources import SourceError
from fdreamer.data.video import VideoDecodeError, probe_video, read_video, write_video


def _clip(path: str | Path) -> np.ndarray:
    return read_video(path, 8, stride=2, size=64).frames


# ------------------------------------------------------------------------------------------ schema


def _full_row(rng: np.random.Generator, t: int = 8, h: int = 16, length: int = 5) -> dict:
    row = {
        "clip_id": schema.make_clip_id("webvid", "42", 0, t, "s2"), "source": "webvid", "video_id": "42",
        "uri": "/x.mp4", "caption": "a cat", "captions": ["a cat", "a kitten"], "motion_caption": "", "split": "train", "motion": "left", "fps": 6.0, "source_width": 128,
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
        assert got["split"] == "train" and got["motion"] == "left" and list(got["captions"]) == ["a cat", "a kitten"]
        np.testing.assert_array_equal(lat, schema.columns_to_tensor(want, "latents"))
    assert schema.SCHEMA_VERSION == 3
    assert pq.read_schema(tmp_path / "s.parquet").metadata[b"fdreamer.schema_version"] == b"3"
    assert pq.read_schema(tmp_path / "s.parquet").field("captions").type == pa.list_(pa.string())


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


def test_manifests_detect_formats(sample_clips: Path, rows: list[dict], tmp_path: Path) -> None:
    web = manifests.read_manifest(str(sample_clips / "webvid.csv"))
    pex = manifests.read_manifest(str(sample_clips / "pexels.csv"))
    gen = manifests.read_manifest(str(sample_clips / "manifest.jsonl"))
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


def test_jsonl_record_errors_name_file_line_and_field(tmp_path: Path) -> None:
    good = '{"path": "/a.mp4", "caption": "ok"}'
    deep = "[" * 100_000 + "]" * 100_000  # json.loads alone: RecursionError
    cases = {
        "deep_field": ([good, "", f'{{"path": "/b.mp4", "caption": "x", "meta": {deep}}}'],
                       r"deep_field\.jsonl: line 3: field 'meta' nests arrays/objects more than 32 levels deep"),
        "deep_record": ([good, deep], r"deep_record\.jsonl: line 2: the record nests arrays/objects more than 32"),
        "nested_caption": ([good, '{"path": "/b.mp4", "caption": {"en": "x"}}'],
                           r"line 2, row 1: field 'caption' must be a string or number, got an object"),
        "not_json": ([good, '{"path": "/b.mp4", "caption": "x"'], r"not_json\.jsonl: line 2: invalid JSON"),
        "not_object": (["[1, 2]"], r"line 1: expected one JSON object per line, got list"),
    }
    for name, (lines, match) in cases.items():
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
        with pytest.raises(manifests.ManifestError, match=match):
            manifests.read_manifest(str(tmp_path / f"{name}.jsonl"))
    # 32 levels and bracket-heavy captions are fine; unread columns may nest (up to the limit).
    meta = "[" * 31 + "]" * 31
    (tmp_path / "ok.jsonl").write_text(good + f'\n{{"path": "/b.mp4", "caption": "[[{"[" * 40}", "meta": {meta}}}\n')
    assert [r["caption"] for r in manifests.read_manifest(str(tmp_path / "ok.jsonl"))] == ["ok", "[[" + "[" * 40]


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


def test_kept_copy_compares_ids_as_numbers() -> None:
    def copy(cid: str, caption: str = "") -> dict:
        return {"clip_id": cid, "source": "webvid", "source_width": 128, "source_height": 96, "caption": caption,
                "content_hash": "same", "phash": bytes(32)}

    assert dedup.better_copy(copy("14"), copy("2"))["clip_id"] == "2"  # as text, "14" < "2"
    a, b = (schema.make_clip_id("webvid", v, 0, 8, "s2-64") for v in ("14", "2"))
    assert dedup.better_copy(copy(a), copy(b))["clip_id"] == b
    # A total order over mixed ids, whatever order the copies arrive in.
    ids = ["b", "10", "a10", "2", "02", "a9", "a", "9z"]
    assert sorted(ids, key=dedup.id_order_key) == ["02", "2", "9z", "10", "a", "a9", "a10", "b"]
    rng = np.random.default_rng(0)
    for _ in range(5):
        shuffled = [copy(str(c)) for c in rng.permutation(ids)]
        dropped = dedup.resolve_duplicates(shuffled)
        assert set(dropped) == set(ids) - {"02"} and {v[:2] for v in dropped.values()} == {("02", "exact")}
    # The original (id 2) keeps its caption; the copy's wrong caption is kept in the captions list.
    rows = [copy("14", "a red ball (wrong)"), copy("2", "a blue cube")]
    dropped = dedup.resolve_duplicates(rows)
    assert dropped == {"14": ("2", "exact", 0.0)}
    assert dedup.exact_captions(rows, dropped) == {"2": ["a blue cube", "a red ball (wrong)"]}
    with pytest.raises(ValueError, match=r"repeated: \['2'\]"):
        dedup.resolve_duplicates([*rows, copy("2")])


def test_an_oversized_band_bucket_is_checked_in_windows_and_counted() -> None:
    """40 unrelated clips that share their first 2-byte band (a static title card, say) form a bucket over
    the cap of 8: it is checked in overlapping windows of the hash order (not skipped), the near copy
    planted among them is still found, the work stays bounded and the summary counts the bucket."""
    rng = np.random.default_rng(0)

    def clip(cid: str, phash: bytes) -> dict:
        return {"clip_id": cid, "source": "webvid", "source_width": 64, "source_height": 64, "caption": "",
                "content_hash": cid, "phash": phash}

    rows = [clip(str(i), b"\x00\x00" + rng.integers(0, 256, 30, dtype=np.uint8).tobytes()) for i in range(40)]
    near = bytearray(rows[7]["phash"])
    for band in range(1, 16):  # one bit in each other band: it shares only the oversized bucket with clip 7
        near[2 * band] ^= 0b1
    rows.append(clip("copy_of_7", bytes(near)))  # 15 bits of 256 apart: 3.75 per 64-bit frame, a near copy
    stats: dict[str, int] = {}
    dropped = dedup.resolve_duplicates(rows, max_bucket=8, stats=stats)
    assert dropped == {"copy_of_7": ("7", "near", 15 / 4)}
    assert stats["oversized_buckets"] == 1 and stats["oversized_bucket_members"] == 41
    assert stats["pairs_checked"] < 41 * 40 / 2 / 2  # windows, not all pairs of the bucket
    unbounded: dict[str, int] = {}
    assert dedup.resolve_duplicates(rows, stats=unbounded) == dropped
    assert unbounded["oversized_buckets"] == 0 and unbounded["pairs_checked"] >= 41 * 40 / 2
    with pytest.raises(ValueError, match="max_bucket must be >= 2"):
        dedup.resolve_duplicates(rows, max_bucket=1)


def test_plan_keeps_every_caption_of_an_exact_group() -> None:
    from pipelines.plan import plan_pass2

    def row(cid: str, content: str, phash: int, caption: str, width: int = 128, status: str = "ok") -> dict:
        return {"clip_id": cid, "uri": f"/{cid}.mp4", "source": "webvid", "source_width": width, "source_height": 96,
                "caption": caption, "content_hash": content, "phash": phash.to_bytes(32, "big"), "status": status}

    far = int("f0" * 32, 16)  # 128 of 256 bits from 0: unrelated
    near = 1 << 3 | 1 << 70  # 2 bits from 0 over 4 frames: 0.5 bits per frame
    rows = [row("14", "h1", 0, "wrong"), row("2", "h1", 0, "a dog"), row("30", "h1", 0, "a dog"),
            row("2", "h1", 0, "a brown dog"),  # the same video listed again with another caption
            row("7", "h2", near, "a dog, re-encoded"), row("5", "h3", far, "a cat"),
            row("9", "", 0, "bad", status="quarantined")]
    plan = plan_pass2(rows, done=set())
    assert [(r["clip_id"], r["caption"], r["captions"]) for r in plan.todo] == [
        ("2", "a dog", ["a dog", "a brown dog", "wrong"]), ("5", "a cat", ["a cat"])]
    assert all("phash" not in r for r in plan.todo) and [r["clip_id"] for r in plan.quarantined] == ["9"]
    dups = {(d["clip_id"], d["kept_clip_id"], d["kind"], d["caption"]) for d in plan.duplicates}
    assert dups == {("2", "2", "same_id", "a brown dog"), ("14", "2", "exact", "wrong"),
                    ("30", "2", "exact", "a dog"), ("7", "2", "near", "a dog, re-encoded")}
    assert next(d["distance"] for d in plan.duplicates if d["kind"] == "near") == 0.5
    # dedup_threshold = 0 keeps the near copy; clips already in shards are not written again.
    strict = plan_pass2(rows, done={"5"}, threshold=0.0)
    assert [r["clip_id"] for r in strict.todo] == ["2", "7"] and [r["clip_id"] for r in strict.already] == ["5"]


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
    # the fetch reasons are given by real HTTP faults in tests/test_fetch.py and tests/test_web_inputs.py
    from fdreamer.data.fetch import FETCH_REASONS

    assert set(quarantine.REASONS) == set(files) | {"decode_timeout", "unsupported_uri", *FETCH_REASONS}
    assert quarantine.classify(SourceError("gs://b/k: unsupported")) == "unsupported_uri"


def test_one_s3_client_per_endpoint_and_process() -> None:
    """Workers read many objects: the boto3 client (and its connection pool) is made once per endpoint."""
    from fdreamer.data import manifests

    a = manifests.s3_client("http://127.0.0.1:1")
    assert manifests.s3_client("http://127.0.0.1:1") is a
    assert manifests.s3_client("http://127.0.0.1:2") is not a
