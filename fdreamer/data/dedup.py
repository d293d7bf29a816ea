"""Duplicate detection for video clips: an exact container-independent hash and a perceptual hash.

Exact duplicates (:func:`content_hash`)
    sha256 over the *decoded* sampled frames, each shrunk to 16x16 grayscale (area interpolation)
    and quantised to 4 bits. The bytes of the container never enter the hash, so a remux
    (.mp4 -> .mkv, other muxer flags or metadata) of the same stream hashes the same. Cost: one
    resize per sampled frame, done on frames the pipeline decodes anyway.

Near duplicates (:func:`perceptual_hash`)
    A 64-bit DCT pHash per sampled frame (32x32 grayscale -> 2-D DCT -> the 8x8 lowest frequencies
    -> one bit per coefficient: above the median of the 63 non-DC ones), for ``PHASH_FRAMES``
    frames picked evenly from the sampled clip, concatenated to ``64 * K`` bits. Two clips are near
    duplicates when their mean per-frame Hamming distance is <= ``threshold`` bits (default
    :data:`DEFAULT_THRESHOLD` = 10 of 64). Re-encodes at another CRF and rescaled copies land at
    0-4 bits; unrelated clips sit near 32 (the tests check both sides with numbers).

Cropped copies (:func:`center_hash`)
    A copy with ~10% of each border cropped and rescaled to the frame size moves the pHashes by 7-18.5 bits
    per frame of 64 on the sample clips (most above the threshold), but its full frame is the original's
    central 80%: :func:`center_hash` hashes that region of each clip (the same ``K`` frames), and the
    near-duplicate search also compares one clip's full hash with the other's centre hash (0-4 bits there;
    ``tests/test_dedup_copies.py``: crops, watermarks and grading all found, no distinct clips merged).
    Cost: up to twice the band rows of the near-duplicate shuffle. Each clip enters the band buckets twice,
    with its full and its centre hash (the job's ``plan_stages.band_rows``), and a pair's distance is the
    smallest over the pairings of (full, centre) (:func:`variant_distance`). The centre variant of one clip
    never pairs with its own full variant. Rows without a centre hash (cached by an older version) enter with
    their full hash only.

Trimmed copies (:mod:`fdreamer.data.footage`)
    A clip's hashes compare frames at the same positions of the clip, so a copy trimmed by 1 s is found only
    when its content moves slowly; each video's footage hash (its frames at a fixed rate, matched in any
    order) finds the rest. Such a pair is a duplicate of kind ``footage`` when its clip hashes are further
    apart than the threshold (:func:`copy_kind`), else ``near``.

Global search without O(N^2) (:func:`band_keys`)
    The hash is cut into ``b`` bands of ``r`` bits (default 16 bands x 16 bits for K = 4). Clips
    sharing any band value become candidate pairs, which are then verified with the full Hamming
    distance. For bit-flip rate p the chance a true pair shares a band is ``1 - (1 - (1-p)^r)^b``:
    p = 10/64 -> 0.93, p = 4/64 -> 1.0. The pipeline groups (band index, band value) keys
    (a shuffle of ``b * N`` small rows) and verifies pairs inside each bucket.

    Cost at 19M clips: the hash table is ids + 2 x 32-byte hashes, ~1.6 GB; band keys of the full and
    centre hashes are up to 32 x 19M = 608M rows (~24 GB shuffled). Unrelated clips collide in a 16-bit
    band with probability about 2^-16, i.e. ~19M^2 / 2 / 65536 = 2.8e9 candidate pairs per band, ~1.8e11
    in all with both variants (a bucket holds full and centre keys alike); each check is 3 pairings of 4
    popcounts (~15 ns), ~2,700 CPU-seconds, spread over the cluster. Real data is not uniform
    (static title cards, black frames), so a bucket larger than ``max_bucket`` is not checked all pairs
    against all: its members, sorted by their full hash, are checked in consecutive windows of
    ``max_bucket`` that overlap by half (at most ~2 ``max_bucket`` checks per member; near copies sort close
    together, a pair further apart than ``max_bucket / 2`` in that order is missed) and counted (``stats``, the job's summary ``dedup``).
    Keep the first ``r`` larger (e.g. 24 bits, 12 bands) when that dominates.

Choosing the copy to keep (:func:`better_copy`, :func:`copy_rank`), in this order:

1. more source pixels (``source_width * source_height``, else ``width * height``),
2. the better source (:data:`SOURCE_RANK`): pexels > generic > webvid; any other source ranks
   with webvid,
3. the smaller ``clip_id`` in *natural* order (:func:`id_order_key`): the id is cut into runs of
   ASCII digits and runs of other characters; digit runs compare as numbers (``2 < 14``, so
   ``webvid-2-0-8-…`` is kept over ``webvid-14-0-8-…``), other runs as text, a digit run sorts before
   a text run at the same position, a shorter id that is a prefix sorts first, and runs of equal value
   (``02`` / ``2``) fall back to their text. Every id maps to a different key, so this is a total
   order: the kept copy is the same whatever order the clips arrive in.

Captions are never dropped with a copy: :func:`exact_captions` gives each kept clip the distinct
captions of its exact-duplicate group (kept caption first), which the job writes as the ``captions``
column; every dropped copy's own caption is also in ``duplicates.parquet``.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import cv2
import numpy as np

PHASH_FRAMES = 4
DEFAULT_THRESHOLD = 10.0  # mean per-frame Hamming distance (bits of 64)
DEFAULT_BANDS = 16
SOURCE_RANK = {"pexels": 2, "generic": 1, "webvid": 0}


def _check(frames: np.ndarray) -> None:
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {getattr(frames, 'shape', type(frames))}")


def _gray(frame: np.ndarray, side: int) -> np.ndarray:
    """[H, W, 3] uint8 RGB -> [side, side] float32 grayscale (area interpolation)."""
    g = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    return cv2.resize(g, (side, side), interpolation=cv2.INTER_AREA).astype(np.float32)


def content_hash(frames: np.ndarray) -> str:
    """Hex sha256 of the decoded frames at 16x16 grayscale, quantised to 4 bits per pixel."""
    _check(frames)
    h = hashlib.sha256()
    h.update(np.asarray(frames.shape[:1], dtype=np.int32).tobytes())
    for f in frames:  # [H, W, 3]
        q = (np.clip(np.round(_gray(f, 16)), 0, 255).astype(np.uint8) >> 4)  # [16, 16] in 0..15
        h.update(q.tobytes())
    return h.hexdigest()


def frame_phash(frame: np.ndarray) -> int:
    """64-bit DCT pHash of one uint8 [H, W, 3] frame."""
    dct = cv2.dct(_gray(frame, 32))[:8, :8]  # lowest 8x8 frequencies
    coeffs = dct.flatten()  # [64]
    med = np.median(coeffs[1:])  # DC excluded from the median (it only carries brightness)
    bits = coeffs > med
    return int("".join("1" if b else "0" for b in bits), 2)


def phash_frame_indices(num_frames: int, k: int = PHASH_FRAMES) -> list[int]:
    """``k`` indices spread evenly over ``num_frames`` (with repeats when the clip is shorter)."""
    return [round(i * (num_frames - 1) / max(k - 1, 1)) for i in range(k)]


def perceptual_hash(frames: np.ndarray, k: int = PHASH_FRAMES) -> bytes:
    """Concatenated per-frame pHashes of ``k`` evenly spaced frames: ``8 * k`` bytes, big endian."""
    _check(frames)
    return b"".join(frame_phash(frames[i]).to_bytes(8, "big") for i in phash_frame_indices(len(frames), k))


CROP_BORDER = 0.1  # fraction of each side the centre hash leaves out


def center_hash(frames: np.ndarray, k: int = PHASH_FRAMES, border: float = CROP_BORDER) -> bytes:
    """:func:`perceptual_hash` of the central region of each frame (``border`` of each side left out): what a
    copy cropped by about ``border`` per side and rescaled shows in its full frame."""
    _check(frames)
    h, w = frames.shape[1:3]
    y, x = int(round(h * border)), int(round(w * border))
    return perceptual_hash(np.ascontiguousarray(frames[:, y:h - y, x:w - x]), k)


HASH_SIDE = 64  # pass 1 decodes each clip at this square side (shorter side scaled in the decoder, centre crop)
HASH_VERSION = 3  # enters the pass-1 cache key: 3 = + footage hash; 2 = from HASH_SIDE frames; 1 = the profile's size


def clip_hashes(frames: np.ndarray) -> dict[str, Any]:
    """The three hashes of a clip's ``HASH_SIDE`` frames: ``content_hash``, ``phash``, ``phash_center``."""
    return {"content_hash": content_hash(frames), "phash": perceptual_hash(frames), "phash_center": center_hash(frames)}


def copy_kind(distance: float, threshold: float = DEFAULT_THRESHOLD) -> str:
    """``near`` when a dropped copy's clip hashes are within ``threshold`` of the kept one's, else ``footage``
    (the same footage found through the footage hashes: a trimmed copy, other frames of the clip)."""
    return "near" if distance <= threshold else "footage"


def variants(row: Mapping[str, Any]) -> list[bytes]:
    """The hashes a row enters the near-duplicate search with: its full ``phash`` and, when it has one, its
    ``phash_center``."""
    center = row.get("phash_center")
    return [bytes(row["phash"])] + ([bytes(center)] if center else [])


def variant_distance(a: Sequence[bytes], b: Sequence[bytes]) -> float:
    """The smallest :func:`mean_frame_distance` between a hash of ``a`` and one of ``b`` (:func:`variants`)
    except centre against centre, which a cropped copy never needs (its full frame is the other's centre)."""
    return min(mean_frame_distance(x, y) for i, x in enumerate(a) for j, y in enumerate(b) if i == 0 or j == 0)


def hamming(a: bytes, b: bytes) -> int:
    """Number of differing bits of two equal-length hashes."""
    if len(a) != len(b):
        raise ValueError(f"hashes differ in length: {len(a)} vs {len(b)} bytes")
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).bit_count()


def mean_frame_distance(a: bytes, b: bytes) -> float:
    """Hamming distance per 64-bit frame hash."""
    return hamming(a, b) / (len(a) / 8)


def band_keys(phash: bytes, bands: int = DEFAULT_BANDS) -> list[str]:
    """LSH band keys ``"<band>:<hex>"``: the hash cut into ``bands`` equal pieces."""
    if len(phash) % bands:
        raise ValueError(f"a {len(phash)}-byte hash does not split into {bands} bands")
    width = len(phash) // bands
    return [f"{i}:{phash[i * width:(i + 1) * width].hex()}" for i in range(bands)]


def phash_words(phashes: Sequence[bytes]) -> np.ndarray:
    """``N`` equal-length hashes of ``8 * K`` bytes -> uint64 ``[N, K]`` (one 64-bit word per frame hash)."""
    if not len(phashes):
        return np.zeros((0, PHASH_FRAMES), np.uint64)
    data = b"".join(bytes(p) for p in phashes)
    return np.frombuffer(data, dtype=">u8").astype(np.uint64).reshape(len(phashes), -1)  # [N, K]


def band_values(phashes: Sequence[bytes], bands: int = DEFAULT_BANDS) -> np.ndarray:
    """int64 ``[N, bands]``: the value of every band of every hash, tagged with its band index.

    The vectorised form of :func:`band_keys`: entry ``[n, i]`` is ``i << (8 * width) | band i of hash n``
    (``width`` bytes a band, big endian), so equal entries mean the same (band index, band value) bucket.
    """
    if not len(phashes):
        return np.zeros((0, bands), np.int64)
    size = len(bytes(phashes[0]))
    if size % bands:
        raise ValueError(f"a {size}-byte hash does not split into {bands} bands")
    width = size // bands
    if width > 6:
        raise ValueError(f"bands of {width} bytes do not fit a 64-bit key with their index; use more bands")
    raw = np.frombuffer(b"".join(bytes(p) for p in phashes), np.uint8).reshape(len(phashes), bands, width)
    value = np.zeros((len(phashes), bands), np.int64)
    for b in range(width):  # big endian: the first byte is the most significant
        value = (value << 8) | raw[:, :, b].astype(np.int64)
    return value | (np.arange(bands, dtype=np.int64) << (8 * width))[None, :]  # [N, bands]


def _window_pairs(words: np.ndarray, limit: int, rows_per_block: int,
                  centers: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, bits) of every pair i < j of ``words`` [n, K] whose summed Hamming distance is <= ``limit``;
    with ``centers`` ([n, K], an all-zero row where a row has no centre hash) the distance
    is the smallest of full-full, full-centre and centre-full (:func:`variant_distance`).

    numpy XOR + popcount over blocks of rows (memory ~ rows_per_block * n * K words).
    """
    n = len(words)
    out_i, out_j, out_d = [], [], []
    for r0 in range(0, n - 1, rows_per_block):
        r1 = min(n, r0 + rows_per_block)
        bits = np.bitwise_count(words[r0:r1, None, :] ^ words[None, :, :]).sum(-1, dtype=np.int64)  # [r, n]
        if centers is not None:
            fc = np.bitwise_count(words[r0:r1, None, :] ^ centers[None, :, :]).sum(-1, dtype=np.int64)
            cf = np.bitwise_count(centers[r0:r1, None, :] ^ words[None, :, :]).sum(-1, dtype=np.int64)
            missing = ~centers.any(-1)  # no centre hash: those pairings do not count
            fc[:, missing] = np.iinfo(np.int64).max
            cf[missing[r0:r1], :] = np.iinfo(np.int64).max
            bits = np.minimum(bits, np.minimum(fc, cf))
        upper = np.arange(n)[None, :] > np.arange(r0, r1)[:, None]  # j > i only
        ii, jj = np.nonzero((bits <= limit) & upper)
        out_i.append(ii + r0)
        out_j.append(jj)
        out_d.append(bits[ii, jj])
    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_d)


def bucket_near_pairs(
    phashes: Sequence[bytes], threshold: float = DEFAULT_THRESHOLD, max_bucket: int = 10_000,
    order_keys: Sequence[str] | None = None, centers: Sequence[bytes | None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The near-duplicate pairs of one band bucket, vectorised: ``(i, j, distance, pairs checked)``.

    ``i < j`` index ``phashes``; ``distance`` is :func:`mean_frame_distance` (<= ``threshold``), or with
    ``centers`` (each row's centre hash or None) :func:`variant_distance`. A bucket
    over ``max_bucket`` members is checked in windows of its hash order that overlap by half (module
    docstring; ties of equal hashes broken by ``order_keys``, e.g. the clip ids), each pair reported once.
    """
    if max_bucket < 2:
        raise ValueError(f"max_bucket must be >= 2, got {max_bucket}")
    words = phash_words(phashes)  # [m, K]
    m, k = words.shape
    cwords = None
    if centers is not None and any(centers):  # an all-zero row: no centre hash (its pairings do not count)
        cwords = phash_words([bytes(c) if c else bytes(8 * k) for c in centers])
    limit = int(np.floor(threshold * k + 1e-9))  # mean <= threshold  <=>  summed bits <= threshold * K
    rows_per_block = max(1, 2_000_000 // max(m * k, 1))
    if m <= max_bucket:
        i, j, bits = _window_pairs(words, limit, rows_per_block, cwords)
        return i, j, bits / k, m * (m - 1) // 2
    keys = list(order_keys) if order_keys is not None else [""] * m
    order = np.array(sorted(range(m), key=lambda n: (bytes(phashes[n]), keys[n])), dtype=np.int64)
    step = max_bucket // 2
    found: dict[tuple[int, int], int] = {}
    checked = 0
    for start in range(0, m - step, step):
        window = order[start:start + max_bucket]
        checked += len(window) * (len(window) - 1) // 2
        wi, wj, bits = _window_pairs(words[window], limit, max(1, 2_000_000 // max(len(window) * k, 1)),
                                     None if cwords is None else cwords[window])
        for a, b, d in zip(window[wi].tolist(), window[wj].tolist(), bits.tolist(), strict=True):
            found[(min(a, b), max(a, b))] = d
    pairs = sorted(found)
    i = np.array([p[0] for p in pairs], np.int64)
    j = np.array([p[1] for p in pairs], np.int64)
    return i, j, np.array([found[p] for p in pairs], np.float64) / k, checked


def variant_keys(hashes: Sequence[bytes], bands: int = DEFAULT_BANDS) -> set[int]:
    """The band keys (:func:`band_values`) of all of a row's :func:`variants`."""
    return {int(v) for v in band_values(list(hashes), bands).reshape(-1)}


def first_shared_key(a: Sequence[bytes], b: Sequence[bytes], bands: int = DEFAULT_BANDS) -> int | None:
    """The smallest band key two rows share over their variants (None when none): a pair that meets in
    several buckets is reported by that one only."""
    shared = variant_keys(a, bands) & variant_keys(b, bands)
    return min(shared) if shared else None


def first_shared_band(a: bytes, b: bytes, bands: int = DEFAULT_BANDS) -> int:
    """The lowest band index where two hashes are equal (``bands`` when none): a pair that shares several
    band buckets is reported by the lowest one only."""
    width = len(a) // bands
    for i in range(bands):
        if a[i * width:(i + 1) * width] == b[i * width:(i + 1) * width]:
            return i
    return bands


_DIGITS = re.compile(r"([0-9]+)")


def id_order_key(clip_id: object) -> tuple[tuple[int, int, str], ...]:
    """Natural sort key of an id: ``"2" < "14"``, ``"a9" < "a10"``, ``"02" < "2"`` (module docstring).

    One ``(kind, number, text)`` per run: ``(0, int, run)`` for a run of ASCII digits, ``(1, 0, run)``
    for any other run. The texts of the runs spell the id, so different ids never share a key.
    """
    runs = (t for t in _DIGITS.split(str(clip_id)) if t)
    return tuple((0, int(t), t) if t.isascii() and t.isdigit() else (1, 0, t) for t in runs)


def copy_rank(r: Mapping[str, Any]) -> tuple:
    """Sort key of a copy, best first: more pixels, then the better source, then the smaller id."""
    pixels = int(r.get("source_width") or r.get("width") or 0) * int(r.get("source_height") or r.get("height") or 0)
    return (-pixels, -SOURCE_RANK.get(str(r.get("source")), 0), id_order_key(r.get("clip_id")))


def better_copy(a: Mapping[str, Any], b: Mapping[str, Any]) -> Mapping[str, Any]:
    """The copy to keep (:func:`copy_rank`): more pixels, then pexels over webvid, then the smaller id."""
    return a if copy_rank(a) <= copy_rank(b) else b


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def resolve_duplicates(
    rows: Sequence[Mapping[str, Any]],
    threshold: float = DEFAULT_THRESHOLD,
    bands: int = DEFAULT_BANDS,
    max_bucket: int = 10_000,
    stats: dict[str, int] | None = None,
) -> dict[str, tuple[str, str, float]]:
    """Map each dropped ``clip_id`` to ``(kept clip_id, "exact"|"near"|"footage", distance)``.

    ``rows`` hold ``clip_id, content_hash, phash`` (bytes) and the fields :func:`better_copy` reads.
    Exact groups share ``content_hash``; near groups are connected components of verified band
    candidates. One copy per component survives (:func:`copy_rank`). ``clip_id`` values must be
    unique (the job sets repeats of an id aside first); ValueError otherwise. ``stats`` (when given) gets
    ``band_buckets`` (buckets with 2+ members), ``pairs_checked``, ``oversized_buckets`` and
    ``oversized_bucket_members`` (buckets over ``max_bucket``, checked in windows: module docstring).
    """
    from fdreamer.data.footage import FOOTAGE_MAX_BUCKET, footage_keys, is_footage_copy  # footage imports this module

    if max_bucket < 2:
        raise ValueError(f"max_bucket must be >= 2, got {max_bucket}")
    counts = {"band_buckets": 0, "pairs_checked": 0, "oversized_buckets": 0, "oversized_bucket_members": 0}
    by_id = {str(r["clip_id"]): r for r in rows}
    if len(by_id) != len(rows):
        repeated = sorted(cid for cid, n in Counter(str(r["clip_id"]) for r in rows).items() if n > 1)
        raise ValueError(f"clip ids must be unique, repeated: {repeated[:5]}")
    uf = _UnionFind()
    kind: dict[frozenset, tuple[str, float]] = {}
    exact: dict[str, list[str]] = defaultdict(list)
    for cid, r in by_id.items():
        uf.find(cid)
        exact[str(r["content_hash"])].append(cid)
    for ids in exact.values():
        for other in ids[1:]:
            uf.union(ids[0], other)
            kind[frozenset((ids[0], other))] = ("exact", 0.0)
    buckets: dict[str, list[str]] = defaultdict(list)
    for cid, r in by_id.items():  # each clip with its full and its centre hash (a cropped copy's full frame)
        for key in dict.fromkeys(k for h in variants(r) for k in band_keys(h, bands)):
            buckets[key].append(cid)
        for fkey in footage_keys(r.get("footage")):  # and its video's footage hash (a trimmed copy)
            buckets[f"f:{fkey}"].append(cid)
    for bucket, members in buckets.items():
        if len(members) < 2:
            continue
        counts["band_buckets"] += 1
        footage = bucket.startswith("f:")
        cap = max(2, min(max_bucket, FOOTAGE_MAX_BUCKET)) if footage else max_bucket
        windows = [members]
        if len(members) > cap:
            counts["oversized_buckets"] += 1
            counts["oversized_bucket_members"] += len(members)
            field = "footage" if footage else "phash"
            ordered = sorted(members, key=lambda c: (bytes(by_id[c].get(field) or b""), c))
            step = cap // 2  # overlapping windows: a pair at distance < cap/2 in the order is seen
            windows = [ordered[i:i + cap] for i in range(0, len(ordered) - step, step)]
        for window in windows:
            for i, a in enumerate(window):
                for b in window[i + 1:]:
                    if uf.find(a) == uf.find(b):
                        continue
                    counts["pairs_checked"] += 1
                    d = variant_distance(variants(by_id[a]), variants(by_id[b]))
                    if d <= threshold or (footage and is_footage_copy(by_id[a].get("footage"),
                                                                      by_id[b].get("footage"), threshold)):
                        uf.union(a, b)
                        kind[frozenset((a, b))] = ("near", d)
    if stats is not None:
        stats.update(counts)
    groups: dict[str, list[str]] = defaultdict(list)
    for cid in by_id:
        groups[uf.find(cid)].append(cid)
    dropped: dict[str, tuple[str, str, float]] = {}
    for members in groups.values():
        if len(members) < 2:
            continue
        best = by_id[members[0]]
        for m in members[1:]:
            best = better_copy(best, by_id[m])
        keep = str(best["clip_id"])
        for m in members:
            if m == keep:
                continue
            if by_id[m]["content_hash"] == best["content_hash"]:
                dropped[m] = (keep, "exact", 0.0)
            else:
                d = variant_distance(variants(by_id[m]), variants(best))
                dropped[m] = (keep, copy_kind(d, threshold), d)
    return dropped


def exact_captions(
    rows: Sequence[Mapping[str, Any]], dropped: Mapping[str, tuple[str, str, float]]
) -> dict[str, list[str]]:
    """``{kept clip_id: captions}``: the distinct captions of each kept clip's exact-duplicate group.

    ``rows`` are every ok row (a ``clip_id`` may repeat: the same video listed twice; its first row
    is the kept one), ``dropped`` is :func:`resolve_duplicates` over the first rows. A group is the
    kept clip, the copies dropped into it as ``"exact"`` and repeats of its id. The list starts with
    the kept row's caption, then the other captions in :func:`copy_rank` order (repeats of one id in
    row order); equal strings appear once. Near duplicates are other frames: their captions are not
    merged (``duplicates.parquet`` keeps them).
    """
    groups: dict[str, list[tuple[bool, tuple, int, str]]] = defaultdict(list)
    for i, r in enumerate(rows):
        cid = str(r["clip_id"])
        keep, kind, _ = dropped.get(cid, (cid, "exact", 0.0))
        if kind == "exact":  # (not the kept id, rank, row number, caption): the kept id's rows sort first
            groups[keep].append((cid != keep, copy_rank(r), i, str(r["caption"])))
    return {keep: list(dict.fromkeys(c for *_, c in sorted(items))) for keep, items in groups.items()}


def iter_ids(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """The clip ids of ``rows`` (helper for summaries)."""
    return [str(r["clip_id"]) for r in rows]
