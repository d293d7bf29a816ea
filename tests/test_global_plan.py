"""The preprocessing job's global plan (pipelines/global_plan.py, pipelines/plan_stages.py).

1. The partition functions, run over one partition, decide exactly what the single-process reference
   ``pipelines.plan.plan_pass2`` decides (same-id repeats, exact groups and their captions, near chains,
   clips already in shards), with numbers.
2. On the session's Ray head, the hash-partitioned plan (4 partitions) over a synthetic manifest with
   planted copies (``helpers/synthetic_dedup.py``) finds exactly the planted duplicates, and a rerun takes
   pass 1 from the cache (the one-task plan runs in every job test); a bad record fails with manifest, line and field.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
from helpers import synthetic_dedup as sd
from helpers.ray_cluster import subprocess_env

from fdreamer.data import dedup
from pipelines import plan_stages as ps
from pipelines.config import PreprocessConfig
from pipelines.plan import plan_pass2

REPO = Path(__file__).resolve().parents[1]
PROFILE = PreprocessConfig().profile.stage_dict()


def _rows(n: int) -> list[dict]:
    """Pass-1 rows of ``n`` synthetic records, plus a repeat of record 4 (another caption), an exact copy
    under id v14 of v2's... and a quarantined record, each with its manifest position."""
    recs = [{"source": "generic", "video_id": f"v{i}", "uri": f"/s/v{i}.mp4", "caption": f"caption {i}",
             "motion_caption": "", "split": "", "motion": "", "width": 320 if i % sd.PERIOD == 2 else 640,
             "height": 180 if i % sd.PERIOD == 2 else 360, "kind": "video"} for i in range(n)]
    recs.append(dict(recs[4], caption="another caption of 4"))  # the same video listed again
    rows = sd.hasher(pa.Table.from_pylist(recs), PROFILE).to_pylist()
    rows.append(dict(rows[5], clip_id="bad", uri="/s/bad.mp4", status="quarantined", reason="corrupt", detail="x"))
    return [dict(r, row_order=i, kind="video") for i, r in enumerate(rows)]


def _as_dict(dropped: pa.Table) -> dict[str, tuple]:
    """resolve_near's table as {dropped id: (kept id, distance, kept hashes)}."""
    return {r["clip_id"]: (r["kept_clip_id"], r["distance"], dedup.variants(
        {"phash": r["kept_phash"], "phash_center": r["kept_phash_center"]})) for r in dropped.to_pylist()}


def _one_partition(rows: list[dict], done: set[str]) -> pa.Table:
    table = pa.Table.from_pylist(rows, schema=ps.PASS1_SCHEMA)
    markers = ps._conform(pa.table({"clip_id": sorted(done), "status": [ps.DONE] * len(done)}), ps.PASS1_SCHEMA)
    exact = ps.exact_groups(ps.first_of_each_id(pa.concat_tables([table, markers])))
    edges = ps.near_edges(ps.band_rows(exact), max_bucket=4)
    dropped, stats = ps.resolve_near(edges)
    assert stats["band_buckets"] > 0 and stats["pairs_checked"] >= dropped.num_rows
    return ps.apply_near(exact, dropped)


def test_partition_functions_match_the_reference_plan() -> None:
    rows = _rows(160)
    done = {sd.clip_id(7, PROFILE), sd.clip_id(51, PROFILE)}  # a kept clip and an exact copy already written
    ref = plan_pass2([dict(r) for r in rows], done)
    got = _one_partition(rows, done).to_pylist()
    want_dups = {(d["clip_id"], d["kept_clip_id"], d["kind"], round(d["distance"], 6)) for d in ref.duplicates}
    got_dups = {(r["clip_id"], r["kept_clip_id"], r["dup_kind"], round(r["distance"], 6)) for r in got
                if r["role"] == ps.DUP and not (r["done"] and r["dup_kind"] != "same_id")}
    assert got_dups == want_dups and len(want_dups) == 3 + 4 + 4 + 1  # exact (v51 is written: already), near, footage, repeat
    assert {r["clip_id"] for r in got if r["role"] == ps.KEEP and not r["done"]} == {r["clip_id"] for r in ref.todo}
    assert {r["clip_id"] for r in got if r["done"] and r["dup_kind"] != "same_id"} == {r["clip_id"] for r in ref.already}
    assert [r["uri"] for r in got if r["role"] == ps.QUARANTINE] == ["/s/bad.mp4"]
    # Captions of the kept rows: the repeat's caption joins record 4's, the exact copy's joins its original's.
    captions = {r["clip_id"]: r["captions"] for r in got if r["role"] == ps.KEEP and not r["done"]}
    assert captions == {r["clip_id"]: r["captions"] for r in ref.todo}
    assert captions[sd.clip_id(4, PROFILE)] == ["caption 4", "another caption of 4"]
    assert captions[sd.clip_id(100, PROFILE)] == ["caption 100", "caption 101"]


def test_a_video_listed_twice_is_hashed_once_and_keeps_each_records_labels() -> None:
    """The pass-1 cache key leaves labels out (``stages.LABEL_FIELDS``): two records of one video with other
    captions and splits are hashed once, and each pass-1 row carries its own record's labels and position."""
    from pipelines import global_plan, stages

    rec = {"source": "generic", "video_id": "v4", "uri": "/s/v4.mp4", "caption": "first", "motion_caption": "",
           "split": "train", "motion": "", "source_width": 640, "source_height": 360, "kind": "video",
           "status": ps.RECORD, "clip_id": ""}
    recs = [dict(rec, row_order=0), dict(rec, caption="second", motion_caption="pan", split="heldout", row_order=7)]
    recs = [dict(r, record_key=stages.record_key({k: r[k] for k in ("source", "video_id", "uri", "caption",
                                                                     "motion_caption", "split", "motion", "kind")},
                                                   PROFILE)) for r in recs]
    assert recs[0]["record_key"] == recs[1]["record_key"]
    calls: list[int] = []

    def counting(batch: pa.Table, profile: dict, s3_endpoint: str | None = None) -> pa.Table:
        calls.append(batch.num_rows)
        return sd.hasher(batch, profile)

    out = global_plan._hash_records(pa.Table.from_pylist(recs, schema=ps.PASS1_SCHEMA), counting,
                                    {"profile": PROFILE}).to_pylist()
    assert calls == [1]
    assert [(r["row_order"], r["caption"], r["motion_caption"], r["split"]) for r in out] == [
        (0, "first", "", "train"), (7, "second", "pan", "heldout")]
    assert out[0]["content_hash"] == out[1]["content_hash"] == sd.content_hash_of(4)


def test_a_pair_in_several_bands_is_reported_once_and_a_chain_is_one_component() -> None:
    base = bytes(range(32))
    near1 = bytes([base[0] ^ 1]) + base[1:]  # 1 bit off in band 0: shares bands 1..15
    near2 = near1[:31] + bytes([near1[31] ^ 3])  # 2 more bits, in band 15
    rows = [{"clip_id": c, "phash": p, "source_width": w, "source_height": 10, "source": "generic",
             "role": ps.KEEP} for c, p, w in (("a", near2, 10), ("b", base, 30), ("c", near1, 20))]
    bands = ps.band_rows(ps._conform(pa.Table.from_pylist(rows), ps.PLAN_SCHEMA))
    assert bands.num_rows == 3 * 16
    edges = ps.near_edges(bands)
    pairs = edges.filter(pa.compute.is_valid(edges.column("a_clip_id")))
    assert sorted(zip(pairs.column("a_clip_id").to_pylist(), pairs.column("b_clip_id").to_pylist())) == [
        ("a", "b"), ("a", "c"), ("b", "c")]  # each pair once, though they share up to 15 bands
    dropped, _ = ps.resolve_near(edges)
    assert _as_dict(dropped) == {"a": ("b", 3 / 4, [base]), "c": ("b", 1 / 4, [base])}  # b has the most pixels; its hashes (no centre)


def test_a_cropped_copy_meets_its_original_through_the_centre_hash() -> None:
    """Each row enters the buckets with its full and centre hashes; the copy's full hash is the original's
    centre (1 bit off): one edge, reported once, at distance 1/4 bit per frame; without centre hashes, none."""
    full, centre = bytes(range(32)), bytes(range(100, 132))
    crop = bytes([centre[0] ^ 1]) + centre[1:]
    rows = [{"clip_id": "orig", "phash": full, "phash_center": centre, "source_width": 40, "source_height": 10,
             "source": "generic", "role": ps.KEEP},
            {"clip_id": "crop", "phash": crop, "phash_center": bytes(range(200, 232)), "source_width": 20,
             "source_height": 10, "source": "generic", "role": ps.KEEP}]
    bands = ps.band_rows(ps._conform(pa.Table.from_pylist(rows), ps.PLAN_SCHEMA))
    assert bands.num_rows == 2 * 32  # 16 keys per hash, two hashes per row
    edges = ps.near_edges(bands.sort_by([("band_key", "ascending")]))
    pairs = edges.filter(pa.compute.is_valid(edges.column("a_clip_id")))
    assert pairs.num_rows == 1 and pairs.column("distance").to_pylist() == [1 / 4]
    dropped, _ = ps.resolve_near(edges)
    assert _as_dict(dropped) == {"crop": ("orig", 1 / 4, [full, centre])}
    plain = [{k: v for k, v in r.items() if k != "phash_center"} for r in rows]
    bands = ps.band_rows(ps._conform(pa.Table.from_pylist(plain), ps.PLAN_SCHEMA))
    assert bands.num_rows == 2 * 16 and ps.resolve_near(ps.near_edges(bands))[0].num_rows == 0


DRIVER = """
import json, sys, ray
sys.path.insert(0, {tests!r})
from helpers import synthetic_dedup as sd
from pipelines import global_plan
from pipelines.config import PreprocessConfig
ray.init(address={address!r}, log_to_driver=False, runtime_env={{"env_vars": {{"PYTHONPATH": {pythonpath!r}}}}})
ray.data.DataContext.get_current().enable_progress_bars = False
profile = PreprocessConfig().profile.stage_dict()
records = global_plan.read_records([{manifest!r}], profile, None)
out = {{}}
for name, rows in (("partitioned", 400), ("rerun", 400)):
    gp = global_plan.plan(records, output={output!r}, s3_endpoint=None, profile=profile, partition_rows=rows,
                          threshold=10.0, bands=16, hash_kwargs={{"hasher": sd.hasher}},
                          hash_stage={{"batch_size": 100}})
    dups = sorted([r["clip_id"], r["kept_clip_id"], r["kind"]] for r in gp.duplicates.take_all())
    out[name] = {{"counts": gp.counts, "dups": dups, "todo": gp.todo.count()}}
bad = {bad!r}
try:
    global_plan.read_records([{manifest!r}, bad], profile, None)
except Exception as exc:
    out["error"] = type(exc).__name__ + ": " + str(exc)
print("RESULT " + json.dumps(out))
"""


def test_the_partitioned_plan_on_the_cluster(ray_head: dict[str, str], tmp_path: Path) -> None:
    n = 1500
    manifest = sd.write_manifest(tmp_path / "m.csv", n)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"path": "/a.mp4", "caption": "a"}\n{"path": "/b.mp4", "caption": ["not", "text"]}\n')
    code = DRIVER.format(tests=str(REPO / "tests"), address=ray_head["address"], pythonpath=f"{REPO / 'tests'}:{REPO}",
                         manifest=str(manifest), output=str(tmp_path / "out"), bad=str(bad))
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), cwd=REPO, capture_output=True,
                          text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    want = sorted([c, k, kind] for c, (k, kind) in sd.expected_duplicates(n, PROFILE).items())
    for name in ("partitioned", "rerun"):
        assert out[name]["dups"] == want, name  # recall 1.0, no false merge
        assert out[name]["todo"] == n - len(want)
    assert out["partitioned"]["counts"]["partitions"] == 4
    assert out["partitioned"]["counts"]["records_hashed"] == n and out["rerun"]["counts"]["records_hashed"] == 0
    assert out["partitioned"]["counts"]["dedup"] == out["rerun"]["counts"]["dedup"]
    # The 15 per-batch cache files became one per partition; the rerun found nothing to compact.
    assert out["partitioned"]["counts"]["cache"]["cache_files"] == 4
    assert out["partitioned"]["counts"]["cache"]["cache_files_removed"] == math.ceil(n / 100)
    assert out["rerun"]["counts"]["cache"] == {"cache_files": 4, "cache_files_removed": 0}
    assert len(list((tmp_path / "out" / "_hashes").glob("part-*.parquet"))) == 4
    assert out["error"] == f"ManifestError: {bad}: line 2, row 1: field 'caption' must be a string or number, got a list"
