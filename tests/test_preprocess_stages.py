"""The per-batch stage functions of the preprocessing job (``pipelines/stages.py``), called directly on
sample clips without Ray: profile keys in pass 1 and 2, the pass-1 hash cache, the ``t5_caption`` option
and the shard writer (names from the clip ids, so a retried write replaces its shard)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fdreamer.data import manifests, schema, storage

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------- profile keys in the stages


def test_profile_keys_change_pass_1_and_2(rows: list[dict]) -> None:
    """clips_per_video, fps, min_side and decode_timeout_s, through ProfileConfig as the job passes them."""
    from pipelines import stages
    from pipelines.config import ProfileConfig

    first = manifests.read_manifest(str(Path(rows[0]["path"]).parents[1] / "manifest.jsonl"))[0]
    recs = pa.Table.from_pylist([dict(first)])

    def hashed(**kw: object) -> list[dict]:
        return stages.hash_videos(recs, ProfileConfig(**kw).stage_dict()).to_pylist()

    # 24 source frames; 4 frames at stride 2 span 7: at most 3 non-overlapping clips.
    assert [r["start_frame"] for r in hashed(num_frames=4, clips_per_video=2)] == [0, 7]
    assert [r["start_frame"] for r in hashed(num_frames=4, clips_per_video=5)] == [0, 7, 14]
    assert [r["fps"] for r in hashed(fps=4.0, stride=None)] == [4.0] and hashed()[0]["fps"] == 6.0
    assert [(r["status"], r["reason"]) for r in hashed(min_side=97)] == [("quarantined", "too_small")]
    assert [r["reason"] for r in hashed(decode_timeout_s=1e-4)] == ["decode_timeout"]
    ok = pa.Table.from_pylist([{k: v for k, v in r.items() if k != "phash"} for r in hashed()])
    assert stages.decode_clips(ok, ProfileConfig().stage_dict()).column("status").to_pylist() == ["ok"]
    late = stages.decode_clips(ok, ProfileConfig(decode_timeout_s=1e-4).stage_dict()).to_pylist()
    assert [(r["status"], r["reason"]) for r in late] == [("quarantined", "decode_timeout")]


# ------------------------------------------------------------------------------- pass-1 hash cache


def test_hash_cache_round_trip_skips_transient(rows: list[dict], tmp_path: Path) -> None:
    from pipelines import global_plan, job, plan_stages, stages

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
    files = sorted(str(p) for p in (tmp_path / "out" / stages.HASH_DIR).glob("part-*.parquet"))
    records = plan_stages._conform(pa.Table.from_pylist(
        [dict(it, status=plan_stages.RECORD, clip_id="", row_order=i) for i, it in enumerate(items)]),
        plan_stages.PASS1_SCHEMA)

    def lookup() -> dict[str, list[dict]]:
        cached = global_plan._read_cache_files(pa.table({"path": files}), None)
        found: dict[str, list[dict]] = {}
        for r in plan_stages.lookup_cache(pa.concat_tables([records, cached])).to_pylist():
            found.setdefault(r["record_key"], []).append(r)
        return found

    found = lookup()
    assert [r["status"] for r in found[items[2]["record_key"]]] == ["record"]  # "missing" is retried next time
    assert found[items[0]["record_key"]][0]["content_hash"] == out.column("content_hash")[0].as_py()
    assert [r["row_order"] for r in found[items[1]["record_key"]]] == [1]  # stamped with the record's position
    # The same block written again (a retried task) replaces its file: no row is doubled.
    stages.hash_and_cache(pa.Table.from_pylist(items), profile, str(tmp_path / "out"))
    assert sorted(str(p) for p in (tmp_path / "out" / stages.HASH_DIR).glob("part-*.parquet")) == files
    assert len(lookup()[items[0]["record_key"]]) == 1
    # A record cached in two files (a batch of another size) is found twice, and the ids stage counts it once.
    stages.hash_and_cache(pa.Table.from_pylist(items[:1]), profile, str(tmp_path / "out"))
    files = sorted(str(p) for p in (tmp_path / "out" / stages.HASH_DIR).glob("part-*.parquet"))
    assert len(lookup()[items[0]["record_key"]]) == 2
    rows = [r for rs in lookup().values() for r in rs if r["status"] != plan_stages.RECORD]
    ids = plan_stages.first_of_each_id(pa.Table.from_pylist(rows, schema=plan_stages.PASS1_SCHEMA)).to_pylist()
    assert sorted((r["clip_id"], r["role"]) for r in ids) == sorted((r["clip_id"], "keep") for r in out.to_pylist()[:2])
    # Re-captioned records keep their key: their cached rows come back with the new labels, nothing re-hashed.
    relabelled = dict(recs[0], caption="a new caption", motion_caption="slow pan", split="heldout")
    assert job.record_key(relabelled, profile) == items[0]["record_key"]
    assert job.record_key(dict(recs[0], uri=recs[0]["uri"] + "?v=2"), profile) != items[0]["record_key"]
    records = records.set_column(records.schema.get_field_index("caption"), "caption",
                                 pa.array(["a new caption", *records.column("caption").to_pylist()[1:]]))
    first = lookup()[items[0]["record_key"]]
    assert {r["status"] for r in first} == {"ok"} and {r["caption"] for r in first} == {"a new caption"}


# ------------------------------------------------------------------------------- t5_caption option


def test_t5_caption_option_through_the_stages(rows: list[dict], tiny_dir: Path, tmp_path: Path) -> None:
    """motion_caption: t5 of the motion caption, an empty one falls back (flagged); CLIP stays on caption."""
    from fdreamer.config import ConfigError, load_config
    from pipelines import job, ledger, stages
    from pipelines.config import PreprocessConfig, ProfileConfig

    recs = [dict(r) for r in manifests.read_manifest(str(Path(rows[0]["path"]).parents[1] / "manifest.jsonl"))[:2]]
    recs[1]["motion_caption"] = ""  # as read from a WebVid/Pexels CSV
    profile = ProfileConfig().stage_dict()
    hashed = stages.hash_videos(pa.Table.from_pylist(recs), profile).drop_columns(["phash"])
    decoded = stages.decode_clips(hashed, profile, flow_size=(16, 16))
    enc_cfg = dataclasses.asdict(PreprocessConfig(models_dir=str(tiny_dir)).resolved_encoders())
    default, motion = stages.EncodeClips(enc_cfg), stages.EncodeClips(enc_cfg, t5_caption="motion_caption")
    got = {"caption": default(decoded).to_pylist(), "motion_caption": motion(decoded).to_pylist()}

    def t5_of(text: str) -> np.ndarray:
        return default.enc.encode_t5_unpadded([text])[0].float().numpy()  # [L, D]

    def t5_row(r: dict) -> np.ndarray:
        return schema.columns_to_tensor(r, "t5").astype(np.float32)

    moved, fell_back = got["motion_caption"]
    assert recs[0]["motion_caption"] and moved["motion_caption"] == recs[0]["motion_caption"]
    np.testing.assert_allclose(t5_row(moved), t5_of(recs[0]["motion_caption"]), atol=1e-3, rtol=1e-3)
    cap = t5_of(recs[0]["caption"])
    n = min(len(cap), moved["t5_length"])
    assert moved["t5_length"] < len(cap) and np.abs(t5_row(moved)[:n] - cap[:n]).max() > 0.5
    np.testing.assert_allclose(t5_row(fell_back), t5_of(recs[1]["caption"]), atol=1e-3, rtol=1e-3)
    assert [r["t5_fallback"] for r in got["motion_caption"]] == [False, True]
    for r, rec, same in zip(got["caption"], recs, got["motion_caption"]):  # default: caption, no fallback
        np.testing.assert_allclose(t5_row(r), t5_of(rec["caption"]), atol=1e-3, rtol=1e-3)
        assert not r["t5_fallback"] and r["clip_text_tokens"] == same["clip_text_tokens"]  # CLIP: caption
    # Shards record the option; fallbacks come back from the writer; another option cannot resume there.
    out = stages.write_shard(pa.Table.from_pylist(got["motion_caption"]), str(tmp_path / "o"),
                             t5_caption="motion_caption")
    assert out.column("t5_fallback").to_pylist() == [False, True]
    # A retried write task (the same rows again) replaces its shard: the name follows from the clip ids.
    shard = out.column("shard")[0].as_py()
    assert shard == stages.part_name([r["clip_id"] for r in got["motion_caption"]]) != stages.part_name(["x"])
    retried = stages.write_shard(pa.Table.from_pylist(got["motion_caption"][::-1]),
                                 str(tmp_path / "o"), t5_caption="motion_caption")
    assert set(retried.column("shard").to_pylist()) == {shard}
    assert [p.name for p in (tmp_path / "o" / "shards").iterdir()] == [shard]
    # The writer returns the shard's ledger row (its own footer) on the shard's first row only.
    record = json.loads(out.column("ledger")[0].as_py())
    assert out.column("ledger")[1].as_py() is None
    assert record["shard"] == shard and record["rows"] == 2 and record["t5_caption"] == "motion_caption"
    assert json.loads(record["column_bytes"])["latents"] > 0
    # No job recorded it (as after a crash): the next run's reconcile reads that footer once and records it.
    fs, base = storage.resolve(str(tmp_path / "o"))
    committed, recovered = ledger.reconcile(fs, base)
    assert recovered == 1 and committed[shard] == json.loads(retried.column("ledger")[0].as_py())  # the file there
    assert ledger.reconcile(fs, base) == (committed, 0)  # recorded now: no footer read again
    per_option = ledger.t5_captions(committed)
    assert per_option == {"motion_caption": 1}
    assert ledger.column_bytes(committed)[0] == 2
    assert len(pq.read_table(tmp_path / "o" / "shards" / shard, columns=["clip_id"])) == 2
    job.check_t5_caption(str(tmp_path / "o"), "motion_caption", per_option)
    mismatch = r"1 shard\(s\) with t5_caption=motion_caption, .* this run's t5_caption=caption"
    with pytest.raises(job.OutputMismatchError, match=mismatch):
        job.check_t5_caption(str(tmp_path / "o"), "caption", per_option)
    assert schema.shard_t5_caption(None) == "caption"  # shards written before the option
    with pytest.raises(ConfigError, match="t5_caption"):
        load_config(PreprocessConfig, overrides=["--t5_caption=motion"])


def test_stage_resources_config() -> None:
    """Decode: a number of tasks or null (every CPU); encode: actors, n or [min, max] (an autoscaling pool)."""
    from fdreamer.config import load_config
    from pipelines.config import PreprocessConfig

    tiny = REPO / "pipelines" / "configs" / "tiny.yaml"
    cfg = load_config(PreprocessConfig, tiny, ["--stages.decode.concurrency=null", "--stages.encode.concurrency=[1, 3]"])
    assert cfg.stages.decode.concurrency is None and cfg.stages.encode.concurrency == (1, 3)
    with pytest.raises(ValueError, match="GPU actors do not use"):
        load_config(PreprocessConfig, tiny, ["--stages.encode.concurrency=null", "--stages.encode.num_gpus=1"])
    from pipelines.job import encoder_pool

    auto = load_config(PreprocessConfig, tiny, ["--stages.encode.concurrency=null"]).stages.encode
    assert [encoder_pool(auto, cpus) for cpus in (1, 2, 16)] == [1, 2, 16]  # one actor per CPU at most
    assert encoder_pool(dataclasses.replace(auto, num_cpus=4.0), 16) == 4 and encoder_pool(cfg.stages.encode, 16) == (1, 3)
    with pytest.raises(ValueError, match="stages.decode.concurrency is a number of tasks or null"):
        load_config(PreprocessConfig, tiny, ["--stages.decode.concurrency=[1, 2]"])

