"""Same-footage detection: a video's frames at a fixed rate, matched in any order (vPDQ's rule), for copies
that clip hashes miss (trimmed copies).

A clip's hashes compare frames at the same positions of the clip, so a copy trimmed by 1 s, whose first
clip starts 1 s later in the footage, is found only when its content moves slowly (4 of 8 sample clips).
Pass 1 also hashes each video's frames at a fixed rate (:data:`FOOTAGE_FPS` = 2 from the start, at most
:data:`FOOTAGE_FRAMES` = 16, i.e. 8 s) into a footage hash, kept on the video's first clip only. Two
footage hashes match when at least :data:`FOOTAGE_MATCH` (half) of the shorter one's frames have a frame
of the other within the threshold, in any order (:func:`footage_match`): a trim keeps most frames, shifted.
Candidates come from :func:`footage_keys`: each 16-bit band of each pair of consecutive frames (32 bits
and the band index): a true copy shares one of its ~60 keys with probability ~1 (per key (1 - p)^32,
0.21 at p = 3/64 flipped bits), an unrelated pair ~2^-34 per pair of keys. Such a pair is a duplicate of
kind ``footage`` when its clip hashes are further apart than the threshold (:func:`fdreamer.data.dedup.copy_kind`), else
``near``. Only the first clips of two videos are linked this way: the other clips of a trimmed copy are
other seconds of the footage, kept unless their own hashes match. Cost: one more decode per video of up to
16 frames over 8 s (at :data:`fdreamer.data.dedup.HASH_SIDE`), and ~60 footage band rows per video in the near shuffle
(~128 bytes more each). Footage buckets are checked pair by pair; one larger than
:data:`FOOTAGE_MAX_BUCKET` (static or black videos) in overlapping windows, counted as oversized.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fdreamer.data.dedup import DEFAULT_THRESHOLD, _check, frame_phash

FOOTAGE_FPS = 2.0  # footage hash: frames at this rate from the start of the video ...
FOOTAGE_FRAMES = 16  # ... at most this many (8 s)
FOOTAGE_MATCH = 0.5  # two footage hashes match when this fraction of the shorter one's frames has a close frame
FOOTAGE_KEY = 1 << 62  # footage band keys carry this bit: apart from the clip hashes' band values (< 2^20)


def footage_hash(frames: np.ndarray) -> bytes:
    """The 64-bit pHash of each frame, concatenated (``8 * T`` bytes): a video's frames at a fixed rate."""
    _check(frames)
    return b"".join(frame_phash(f).to_bytes(8, "big") for f in frames)


def _frame_words(footage: bytes) -> np.ndarray:
    return np.frombuffer(bytes(footage), dtype=">u8").astype(np.uint64)  # [T]


def footage_keys(footage: bytes | None) -> list[int]:
    """Band keys of a footage hash: each band (16 bits of 64) of each pair of consecutive frames, tagged with
    the band index and :data:`FOOTAGE_KEY`. A copy trimmed by a whole number of frame steps shares the pairs of
    the frames both hold; a random pair of videos shares a 32-bit key with probability ~2^-32 per pair of keys."""
    words = _frame_words(footage or b"")
    if len(words) < 2:
        return []
    keys = set()
    for band in range(4):
        v = (words >> np.uint64(16 * band)) & np.uint64(0xFFFF)  # [T]
        for a, b in zip(v[:-1].tolist(), v[1:].tolist(), strict=True):
            keys.add(FOOTAGE_KEY | (band << 32) | (a << 16) | b)
    return sorted(keys)


def footage_match(a: bytes, b: bytes, threshold: float = DEFAULT_THRESHOLD) -> tuple[float, float]:
    """(fraction of the shorter hash's frames within ``threshold`` bits of some frame of the other, their mean
    distance): the vPDQ rule (frames matched in any order), so a trimmed copy matches its original."""
    wa, wb = _frame_words(a), _frame_words(b)
    if len(wa) > len(wb):
        wa, wb = wb, wa
    if not len(wa):
        return 0.0, float("inf")
    best = np.bitwise_count(wa[:, None] ^ wb[None, :]).min(axis=1)  # [Ta]: closest frame of the other
    close = best <= threshold
    return float(close.mean()), float(best[close].mean()) if close.any() else float("inf")


def is_footage_copy(a: bytes | None, b: bytes | None, threshold: float = DEFAULT_THRESHOLD) -> bool:
    return bool(a) and bool(b) and footage_match(a, b, threshold)[0] >= FOOTAGE_MATCH


FOOTAGE_MAX_BUCKET = 1_000  # footage buckets are checked pair by pair: larger ones in windows of this size


def footage_pairs(footages: Sequence[bytes | None], threshold: float = DEFAULT_THRESHOLD, max_bucket: int = 10_000,
                  order_keys: Sequence[str] | None = None) -> tuple[list[tuple[int, int]], int]:
    """The matching pairs ``i < j`` of one footage bucket (:func:`is_footage_copy`) and the pairs checked.

    A bucket over ``min(max_bucket, FOOTAGE_MAX_BUCKET)`` members (static or black videos share keys) is
    checked in windows of the footage order (ties by ``order_keys``) that overlap by half, like
    :func:`bucket_near_pairs`.
    """
    m = len(footages)
    cap = max(2, min(max_bucket, FOOTAGE_MAX_BUCKET))
    windows = [list(range(m))]
    if m > cap:
        keys = list(order_keys) if order_keys is not None else [""] * m
        order = sorted(range(m), key=lambda n: (bytes(footages[n] or b""), keys[n]))
        windows = [order[start:start + cap] for start in range(0, m - cap // 2, cap // 2)]
    found: set[tuple[int, int]] = set()
    checked = 0
    for window in windows:
        checked += len(window) * (len(window) - 1) // 2
        for x, a in enumerate(window):
            for b in window[x + 1:]:
                if is_footage_copy(footages[a], footages[b], threshold):
                    found.add((min(a, b), max(a, b)))
    return sorted(found), checked
