"""The decision between the two passes, in one process: which clips pass 2 writes, which are duplicates.

Input: the pass-1 rows of every manifest record in manifest order (``stages.HASH_SCHEMA``, one row
per sampled clip or one quarantine row per bad record) and the clip ids already in complete shards.
Plain Python, no Ray, in one process: the reference of the job's distributed plan
(:mod:`pipelines.global_plan`, whose partition functions ``tests/test_global_plan.py`` checks against
:func:`plan_pass2`) and the plan of ``tests/bench/bench_preprocess.py``'s plain loop.

- A ``clip_id`` seen again (the same video listed twice) is a ``same_id`` duplicate of its first row.
- Exact and near duplicates come from :func:`fdreamer.data.dedup.resolve_duplicates`; the copy kept
  follows :func:`fdreamer.data.dedup.copy_rank` (more pixels, better source, smaller id in natural
  order, so id ``2`` is kept over id ``14``).
- Every kept row carries ``captions``: the distinct captions of its exact-duplicate group, its own
  caption first (:func:`fdreamer.data.dedup.exact_captions`); every duplicate row keeps its own
  ``caption`` in ``duplicates.parquet``. No caption given in a manifest is lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from fdreamer.data import dedup
from pipelines.stages import OK

DUPLICATES_SCHEMA = pa.schema([
    ("clip_id", pa.string()), ("uri", pa.string()), ("kept_clip_id", pa.string()), ("kind", pa.string()),
    ("distance", pa.float64()), ("caption", pa.string()),
])


@dataclass
class Plan:
    """Pass-1 rows sorted into what happens to them."""

    todo: list[dict] = field(default_factory=list)  # kept, not yet written: pass 2 input (no phash; with captions)
    already: list[dict] = field(default_factory=list)  # kept or not, found in complete shards
    duplicates: list[dict] = field(default_factory=list)  # DUPLICATES_SCHEMA rows
    quarantined: list[dict] = field(default_factory=list)  # pass-1 failures
    dedup: dict[str, int] = field(default_factory=dict)  # resolve_duplicates' stats (buckets, pairs checked)


def plan_pass2(rows: list[dict], done: set[str], threshold: float = dedup.DEFAULT_THRESHOLD,
               bands: int = dedup.DEFAULT_BANDS) -> Plan:
    """Sort pass-1 ``rows`` (manifest order) into a :class:`Plan`; ``done`` = clip ids already in shards."""
    plan = Plan(quarantined=[r for r in rows if r["status"] != OK])
    ok_all = [r for r in rows if r["status"] == OK]
    first: dict[str, dict] = {}
    for r in ok_all:
        if r["clip_id"] in first:  # the same video listed twice: the first row stands for both
            plan.duplicates.append(_duplicate(r, r["clip_id"], "same_id", 0.0))
        else:
            first[r["clip_id"]] = r
    ok_rows = list(first.values())
    dropped = dedup.resolve_duplicates(ok_rows, threshold, bands, stats=plan.dedup)
    captions = dedup.exact_captions(ok_all, dropped)
    for r in ok_rows:
        cid = r["clip_id"]
        if cid in done:
            plan.already.append(r)
        elif cid in dropped:
            keep, kind, dist = dropped[cid]
            plan.duplicates.append(_duplicate(r, keep, kind, dist))
        else:
            plan.todo.append({k: v for k, v in r.items() if k not in ("phash", "phash_center", "footage")} | {"captions": captions[cid]})
    return plan


def _duplicate(r: dict, keep: str, kind: str, distance: float) -> dict:
    return {"clip_id": r["clip_id"], "uri": r["uri"], "kept_clip_id": keep, "kind": kind,
            "distance": float(distance), "caption": r["caption"]}
