"""Near-duplicate recall on the copies a web crawl holds, and precision on distinct clips (real H.264 files).

8 sample clips (4 s each) and, of each, copies re-encoded as H.264: ~10% of every border cropped and
rescaled, a watermark (a semi-transparent logo box and a site name), colour grading (gamma, contrast, a warm tint), and
a copy trimmed by 1 s. Every file is hashed as pass 1 does it (the tiny profile's sampled clip and the
video's footage hash, decoded by the product's reader) and the rows go through the partitioned plan's own functions (band rows, bucket
checks, edges, components) and the reference :func:`fdreamer.data.dedup.resolve_duplicates`.

Measured here: cropped, watermarked, graded and trimmed copies are all found (crops only through the
centre hash, trims only through the footage hash: a 1-s trim shares 2 of the clip's 8 sampled frames
with the original's clip, and 4 of 8 are found without it); no two distinct clips merge.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pytest

from fdreamer.data import dedup
from fdreamer.data.video import probe_video, write_video
from fdreamer.toy.sample_data import write_sample_data
from pipelines import plan_stages as ps
from pipelines import stages
from pipelines.config import ProfileConfig

PROFILE = ProfileConfig(num_frames=8, stride=2, size=64).stage_dict()  # pipelines/configs/tiny.yaml
COPIES = ("crop", "watermark", "grade", "trim")


def _crop(frames: np.ndarray) -> np.ndarray:
    h, w = frames.shape[1:3]
    y, x = int(h * 0.1), int(w * 0.1)
    return np.stack([cv2.resize(f[y:h - y, x:w - x], (w, h), interpolation=cv2.INTER_AREA) for f in frames])


def _watermark(frames: np.ndarray) -> np.ndarray:
    """A semi-transparent logo box in the top-right corner and the stock site's name at the bottom left."""
    out = frames.copy()
    h, w = frames.shape[1:3]
    box = out[:, 4:4 + h // 8, w - 4 - w // 6:w - 4]
    out[:, 4:4 + h // 8, w - 4 - w // 6:w - 4] = (0.5 * box + 120).astype(np.uint8)
    for f in out:
        cv2.putText(f, "stock", (6, h - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.3, (255, 255, 255), 1)
    return out


def _grade(frames: np.ndarray) -> np.ndarray:
    x = frames.astype(np.float32) / 255.0
    x = np.clip((x ** 0.8 - 0.5) * 1.15 + 0.5, 0, 1) * np.array([1.06, 1.0, 0.9], np.float32)
    return np.clip(x * 255, 0, 255).astype(np.uint8)


def _decode_all(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Pass-1 rows (ids ``o<i>`` and ``<copy><i>``) of the originals and their copies."""
    root = tmp_path_factory.mktemp("copies")
    write_sample_data(root / "s", num_clips=8, workers=1, num_frames=48, fps=12)
    out = []
    for i, src in enumerate(sorted((root / "s" / "clips").glob("*.mp4"))):
        frames = _decode_all(src)
        files = {f"o{i}": src}
        for name, edit in (("crop", _crop), ("watermark", _watermark), ("grade", _grade), ("trim", lambda f: f[12:])):
            files[f"{name}{i}"] = write_video(root / f"{name}{i}.mp4", edit(frames), 12.0, crf=23)
        for cid, path in files.items():
            info = probe_video(path)  # as pass 1 decodes and hashes it: the clip, and the video's footage
            clip = stages.hash_clip(str(path), PROFILE, 0, info).frames
            out.append({"clip_id": cid, **dedup.clip_hashes(clip), "footage": stages.footage_of(str(path), info),
                        "source_width": 128, "source_height": 96,
                        "source": "generic" if cid.startswith("o") else "webvid"})  # originals rank first
    return out


def _partitioned(rows: list[dict]) -> dict[str, str]:
    """dropped clip id -> kept clip id through the job's plan functions (one partition)."""
    n = len(rows)
    table = pa.table({**{c: [r[c] for r in rows] for c in ps.BAND_COLUMNS}, "role": [ps.KEEP] * n})
    bands = ps.band_rows(table)
    edges = ps.near_edges(bands.sort_by([("band_key", "ascending")]))
    dropped, stats = ps.resolve_near(edges)
    assert stats["pairs_checked"] > 0
    return dict(zip(dropped.column("clip_id").to_pylist(), dropped.column("kept_clip_id").to_pylist(), strict=True))


def test_crops_watermarks_and_grades_found_distinct_clips_kept(rows: list[dict]) -> None:
    got = _partitioned(rows)
    reference = {cid: keep for cid, (keep, _, _) in dedup.resolve_duplicates(rows).items()}
    assert got == reference  # the partitioned plan and the reference agree
    for copy in ("crop", "watermark", "grade", "trim"):
        found = [got.get(f"{copy}{i}") == f"o{i}" for i in range(8)]
        assert all(found), (copy, found)  # recall 1.0
    originals = [f"o{i}" for i in range(8)]
    assert not set(got) & set(originals)  # precision: no original dropped for another
    assert all(keep == f"o{cid[-1]}" for cid, keep in got.items())  # each copy kept against its own original
    trims = [got.get(f"trim{i}") == f"o{i}" for i in range(8)]
    assert all(trims), trims  # through the footage hashes


def test_crops_need_the_centre_hash(rows: list[dict]) -> None:
    """Without the centre hash (rows cached by an older version) the crops pass as unique."""
    by_id = {r["clip_id"]: r for r in rows}
    full = [dedup.mean_frame_distance(by_id[f"crop{i}"]["phash"], by_id[f"o{i}"]["phash"]) for i in range(8)]
    centre = [dedup.mean_frame_distance(by_id[f"crop{i}"]["phash"], by_id[f"o{i}"]["phash_center"]) for i in range(8)]
    # measured (64-px frames scaled by the decoder): full frames 7-18.5 bits of 64 apart (most above the
    # threshold of 10), centre 0-6.5
    assert max(centre) <= 7.5 and sum(d > dedup.DEFAULT_THRESHOLD for d in full) >= 4, (full, centre)
    plain = [{**r, "phash_center": None} for r in rows]
    assert sum(f"crop{i}" in _partitioned(plain) for i in range(8)) < 8


def test_trims_need_the_footage_hash(rows: list[dict]) -> None:
    """Without footage hashes only trims whose shifted clip stays within the threshold are found; with them,
    the dropped trim is reported as a ``footage`` copy when its clip hashes are far from the original's."""
    plain = [{**r, "footage": None} for r in rows]
    assert sum(_partitioned(plain).get(f"trim{i}") == f"o{i}" for i in range(8)) < 8
    kinds = {cid: kind for cid, (_, kind, _) in dedup.resolve_duplicates(rows).items() if cid.startswith("trim")}
    assert len(kinds) == 8 and "footage" in kinds.values() and set(kinds.values()) <= {"near", "footage"}
