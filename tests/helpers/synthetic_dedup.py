"""A synthetic manifest with planted exact and near duplicates, and a pass-1 hasher that needs no video.

Record ``n`` (video id ``v<n>``) is, by ``n % 50``:
- 1: an exact copy of ``n - 1`` (same content hash and perceptual hash, same size: the smaller id is kept),
- 2: a near copy of ``n - 2`` (its pHash with 2 bits flipped per frame, half the size: the original is kept),
- 3: a trimmed copy of ``n - 3`` (its footage hash without the first 2 frames, 2 bits flipped per frame; the
  clip hashes of other frames, unrelated; half the size: the original is kept): a ``footage`` duplicate,
- anything else: a distinct clip (a random 256-bit pHash, its own content hash).
Every video has a footage hash of 16 random frames (an exact or near copy: its original's, the near copy with
2 bits flipped per frame). So 3 in 50 records are duplicates, and :func:`expected_duplicates` is the ground truth. Distinct pHashes
differ by ~32 bits per frame, far above the 10-bit threshold: a merge of two of them is a false merge.
"""

from __future__ import annotations

import csv
import hashlib
import random
from pathlib import Path

import pyarrow as pa

from fdreamer.data.schema import make_clip_id
from pipelines import stages

PERIOD = 50


def write_manifest(path: Path, n: int) -> Path:
    """A generic CSV manifest of ``n`` records (no video behind them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption", "clip_id", "width", "height"])
        for i in range(n):
            small = i % PERIOD in (2, 3)
            w.writerow([f"/synthetic/v{i}.mp4", f"caption {i}", f"v{i}", 320 if small else 640, 180 if small else 360])
    return path


def _base(n: int) -> int:
    return n - (n % PERIOD) if n % PERIOD in (1, 2) else n


def _flip2(frames: bytearray) -> bytearray:
    for frame in range(len(frames) // 8):  # flip 2 bits in each 64-bit frame hash
        frames[frame * 8] ^= 0b1
        frames[frame * 8 + 5] ^= 0b100
    return frames


def footage_of(n: int) -> bytes:
    """The footage hash of video ``n`` (16 frames)."""
    if n % PERIOD == 3:
        return bytes(_flip2(bytearray(footage_of(n - 3)[16:])))  # trimmed: 2 frames (1 s) fewer, re-encoded
    frames = bytearray(random.Random(f"footage-{_base(n)}").randbytes(16 * 8))
    return bytes(_flip2(frames) if n % PERIOD == 2 else frames)


def phash_of(n: int) -> bytes:
    ph = bytearray(random.Random(_base(n)).randbytes(32))
    return bytes(_flip2(ph) if n % PERIOD == 2 else ph)


def content_hash_of(n: int) -> str:
    return hashlib.sha256(f"content-{_base(n) if n % PERIOD == 1 else n}".encode()).hexdigest()


def hasher(batch: pa.Table, profile: dict, s3_endpoint: str | None = None) -> pa.Table:
    """Pass-1 rows of synthetic records (the signature of :func:`pipelines.stages.hash_videos`)."""
    out = []
    for rec in batch.to_pylist():
        n = int(rec["video_id"][1:])
        base = stages._base_row(rec, profile)
        out.append(base | {"fps": 8.0, "content_hash": content_hash_of(n), "phash": phash_of(n),
                           "footage": footage_of(n), "source_width": int(rec["width"]), "source_height": int(rec["height"])})
    return pa.Table.from_pylist(out, schema=stages.HASH_SCHEMA)


def clip_id(n: int, profile: dict) -> str:
    return make_clip_id("generic", f"v{n}", 0, profile["num_frames"], profile["tag"])


def expected_duplicates(n_records: int, profile: dict) -> dict[str, tuple[str, str]]:
    """``{dropped clip_id: (kept clip_id, kind)}`` of the planted copies."""
    out = {}
    for i in range(n_records):
        if i % PERIOD == 1:
            out[clip_id(i, profile)] = (clip_id(i - 1, profile), "exact")
        elif i % PERIOD == 2:
            out[clip_id(i, profile)] = (clip_id(i - 2, profile), "near")
        elif i % PERIOD == 3:
            out[clip_id(i, profile)] = (clip_id(i - 3, profile), "footage")
    return out
