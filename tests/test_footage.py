"""Footage hashes (fdreamer/data/footage.py): matching in any order, candidate keys, the checked pairs."""

from __future__ import annotations

import numpy as np

from fdreamer.data import footage


def _hash(words: list[int]) -> bytes:
    return b"".join(int(w).to_bytes(8, "big") for w in words)


def _flip(word: int, bits: list[int]) -> int:
    for b in bits:
        word ^= 1 << b
    return word


def test_a_trimmed_copy_matches_in_any_order_and_unrelated_footage_does_not() -> None:
    rng = np.random.default_rng(0)
    frames = [int(w) for w in rng.integers(0, 2**63, 16, dtype=np.int64)]
    trimmed = [_flip(w, [1, 40, 63]) for w in frames[2:]]  # 1 s cut (2 frames at 2 fps), 3 bits re-encoded
    frac, dist = footage.footage_match(_hash(frames), _hash(trimmed))
    assert frac == 1.0 and dist == 3.0  # every frame of the shorter one has its frame, 3 bits apart
    assert footage.is_footage_copy(_hash(frames), _hash(trimmed[::-1]))  # any order
    other = [int(w) for w in rng.integers(0, 2**63, 16, dtype=np.int64)]
    assert footage.footage_match(_hash(frames), _hash(other))[0] == 0.0  # ~32 bits apart
    half = frames[:4] + other[:4]  # 4 of 8 frames: exactly the FOOTAGE_MATCH fraction
    assert footage.footage_match(_hash(half), _hash(frames))[0] == 0.5 and footage.is_footage_copy(_hash(half), _hash(frames))
    assert not footage.is_footage_copy(_hash(frames[:3] + other[:5]), _hash(frames))
    assert not footage.is_footage_copy(b"", _hash(frames)) and footage.footage_keys(_hash(frames[:1])) == []


def test_keys_are_consecutive_frame_pairs_per_band_and_a_trim_shares_them() -> None:
    frames = [0x0001_0002_0003_0004, 0x0011_0012_0013_0014, 0x0021_0022_0023_0024]
    keys = footage.footage_keys(_hash(frames))
    assert len(keys) == 2 * 4 and all(k & footage.FOOTAGE_KEY for k in keys)
    # band 0 = the lowest 16 bits: (0x0004, 0x0014) and (0x0014, 0x0024)
    assert footage.FOOTAGE_KEY | (0 << 32) | (0x0004 << 16) | 0x0014 in keys
    assert footage.FOOTAGE_KEY | (3 << 32) | (0x0011 << 16) | 0x0021 in keys  # band 3: the highest 16 bits
    assert set(footage.footage_keys(_hash(frames[1:]))) < set(keys)  # a trim keeps the later pairs' keys


def test_footage_pairs_checks_windows_of_an_oversized_bucket() -> None:
    """30 identical static footage hashes, a cap of 20: windows [0, 20) and [10, 30) of the order, overlapping
    by half; the pairs of both windows, each once."""
    hashes = [_hash([0] * 8)] * 30
    pairs, checked = footage.footage_pairs(hashes, max_bucket=20, order_keys=[f"{i:02d}" for i in range(30)])
    assert checked == 190 + 190
    assert len(pairs) == 190 + 190 - 45 and len(set(pairs)) == len(pairs) and all(i < j for i, j in pairs)
    assert (0, 29) not in pairs and (0, 19) in pairs and (10, 29) in pairs
    small, checked = footage.footage_pairs(hashes[:5])
    assert len(small) == checked == 10  # under the cap: all pairs
