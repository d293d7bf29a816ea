"""The per-partition work of the job's global plan (pass-1 cache lookup, ids, exact and near duplicates).

Plain functions on ``pyarrow.Table`` partitions, no Ray: :mod:`pipelines.global_plan` runs each one over
partitions that hold *complete groups* of its key (a hash partition of the key, or everything in one
task for a small job), so a function never needs rows of another partition. They reproduce the rules
of the single-process reference :func:`pipelines.plan.plan_pass2` (the tests compare both):

``lookup_cache`` (key ``record_key``)
    manifest records (``status = "record"``) + cached pass-1 rows -> the cached rows stamped with the
    record's ``row_order``, ``kind`` and labels (caption, ...: :data:`pipelines.stages.LABEL_FIELDS`), and
    the records with no cached rows (still ``"record"``: pass 1 hashes them).
``first_of_each_id`` (key ``clip_id``)
    pass-1 rows + ``"done"`` markers (clip ids in complete shards) -> each id's first row in manifest
    order (``role = "keep"``, ``captions`` = its rows' captions, ``done`` flag), later rows of the same
    id as ``same_id`` duplicates, quarantined rows as ``role = "quarantine"``. Rows equal in
    ``(clip_id, row_order)`` (a record whose cached rows were written twice) count once.
``exact_groups`` (key ``content_hash``)
    kept rows -> one per content hash, the best copy (:func:`fdreamer.data.dedup.copy_rank`) with the
    captions of its whole group; the others as ``exact`` duplicates.
``band_rows`` / ``near_edges`` (key ``band_key``)
    kept rows -> one row per LSH band (:func:`fdreamer.data.dedup.band_values`) -> the verified
    near-duplicate pairs of each bucket (numpy XOR + popcount, :func:`fdreamer.data.dedup.bucket_near_pairs`),
    each pair reported by the lowest band it shares, plus one row of counts per partition.
``cache_rows`` (key ``record_key``)
    pass-1 rows -> the distinct rows the compacted ``_hashes/`` cache keeps (one per record key and clip).
``resolve_near`` (the driver, over the edges only) and ``apply_near`` (any partition)
    connected components of the edges -> a table of the dropped copies (the kept copy per component);
    ``apply_near`` joins it: dropped rows become ``near`` duplicates, and exact copies of a dropped row
    follow it to the component's kept copy.

Memory bound on the driver: ``resolve_near`` holds the near-duplicate edges in Arrow (~200 bytes per
edge) and a few integers and a rank tuple per endpoint, never a row per clip; the dropped table
(~100 bytes per near duplicate) is put in the object store once for ``apply_near``.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fdreamer.data import dedup, footage
from pipelines.stages import HASH_SCHEMA, LABEL_FIELDS, OK, QUARANTINED, TRANSIENT_REASONS

RECORD, DONE = "record", "done"  # status of rows that are not pass-1 results: a manifest record, a clip in a shard
KEEP, DUP, QUARANTINE = "keep", "dup", "quarantine"

# Pass-1 rows as the plan moves them: HASH_SCHEMA + the record's position in the manifests and its kind.
PASS1_SCHEMA = pa.schema([*HASH_SCHEMA, pa.field("row_order", pa.int64()), pa.field("kind", pa.string())])
PLAN_SCHEMA = pa.schema([*PASS1_SCHEMA, pa.field("role", pa.string()), pa.field("kept_clip_id", pa.string()),
                         pa.field("dup_kind", pa.string()), pa.field("distance", pa.float64()),
                         pa.field("captions", pa.list_(pa.string())), pa.field("done", pa.bool_())])
EDGE_SCHEMA = pa.schema(
    [pa.field(f"{side}_{name}", typ) for side in ("a", "b") for name, typ in (
        ("clip_id", pa.string()), ("phash", pa.binary()), ("phash_center", pa.binary()), ("source_width", pa.int32()),
        ("source_height", pa.int32()), ("source", pa.string()))]
    + [pa.field("distance", pa.float64()), pa.field("band_buckets", pa.int64()), pa.field("pairs_checked", pa.int64()),
       pa.field("oversized_buckets", pa.int64()), pa.field("oversized_bucket_members", pa.int64())])
NODE_COLUMNS = ("clip_id", "phash", "phash_center", "source_width", "source_height", "source")  # per edge end
BAND_COLUMNS = (*NODE_COLUMNS, "footage")
BAND_SCHEMA = pa.schema([*(PLAN_SCHEMA.field(c) for c in BAND_COLUMNS), pa.field("band_key", pa.int64())])
DROPPED_SCHEMA = pa.schema([("clip_id", pa.string()), ("kept_clip_id", pa.string()), ("distance", pa.float64()),
                            ("kind", pa.string()), ("kept_phash", pa.binary()), ("kept_phash_center", pa.binary())])
STAT_NAMES = ("band_buckets", "pairs_checked", "oversized_buckets", "oversized_bucket_members")


def _conform(table: pa.Table, target: pa.Schema) -> pa.Table:
    """``table`` with ``target``'s columns in order (missing ones null), cast to its types."""
    cols = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
            for f in target]
    return pa.Table.from_arrays(cols, schema=target)


def lookup_cache(table: pa.Table) -> pa.Table:
    """Records + cached pass-1 rows of complete ``record_key`` groups -> PASS1 rows (module docstring)."""
    table = _conform(table, PASS1_SCHEMA)
    is_record = pc.equal(table.column("status"), RECORD)
    records, cached = table.filter(is_record), table.filter(pc.invert(is_record))
    if not cached.num_rows or not records.num_rows:
        return records
    from_record = ["row_order", "kind", *LABEL_FIELDS]  # the current record's, not those of the cached rows
    found = cached.drop_columns(from_record).join(
        records.select(["record_key", *from_record]), "record_key", join_type="inner")
    keys = cached.select(["record_key"]).group_by("record_key").aggregate([])
    missing = records.join(keys, "record_key", join_type="left anti")
    return pa.concat_tables([_conform(found, PASS1_SCHEMA), _conform(missing, PASS1_SCHEMA)])


def cache_rows(table: pa.Table) -> pa.Table:
    """Pass-1 rows of complete ``record_key`` groups -> what the compacted cache keeps (``HASH_SCHEMA``).

    One row per (``record_key``, ``clip_id``): a video listed in several records, or cached twice by a
    retried task, is kept once, so compacting again never multiplies rows. Transient failures
    (:data:`pipelines.stages.TRANSIENT_REASONS`) are left out: the next run tries them again.
    """
    table = _conform(table, PASS1_SCHEMA)
    status, reason = table.column("status"), pc.fill_null(table.column("reason"), "")
    keep = pc.or_(pc.equal(status, OK),
                  pc.and_(pc.equal(status, QUARANTINED), pc.invert(pc.is_in(reason, pa.array(sorted(TRANSIENT_REASONS))))))
    table = table.filter(keep)
    table = table.take(pc.sort_indices(table, [("record_key", "ascending"), ("clip_id", "ascending"),
                                               ("row_order", "ascending")]))
    keys = list(zip(table.column("record_key").to_pylist(), table.column("clip_id").to_pylist(), strict=True))
    first = [i for i, k in enumerate(keys) if i == 0 or k != keys[i - 1]]
    return _conform(table.take(pa.array(first, pa.int64())), HASH_SCHEMA)


def _with_plan(table: pa.Table, default_role: str, **columns: pa.Array) -> pa.Table:
    """PLAN rows: ``table`` with ``role`` (``default_role`` unless given), ``done`` false unless given, ``columns``."""
    n = table.num_rows
    base = {"role": pa.array([default_role] * n, pa.string()), "done": pa.array([False] * n, pa.bool_())}
    for name, value in (base | columns).items():
        table = (table.set_column(table.schema.get_field_index(name), name, value) if name in table.column_names
                 else table.append_column(name, value))
    return _conform(table, PLAN_SCHEMA)


def first_of_each_id(table: pa.Table) -> pa.Table:
    """Pass-1 rows + ``done`` markers of complete ``clip_id`` groups -> PLAN rows (module docstring)."""
    table = _conform(table, PASS1_SCHEMA)
    status = table.column("status")
    done_ids = set(table.filter(pc.equal(status, DONE)).column("clip_id").to_pylist())
    quarantined = table.filter(pc.equal(status, QUARANTINED))
    ok = table.filter(pc.equal(status, OK))
    ok = ok.take(pc.sort_indices(ok, [("clip_id", "ascending"), ("row_order", "ascending")]))
    ids, order, captions = (ok.column(c).to_pylist() for c in ("clip_id", "row_order", "caption"))
    keep_idx, keep_captions, dup_idx, seen = [], [], [], set()
    for i, (cid, row) in enumerate(zip(ids, order, strict=True)):
        if (cid, row) in seen:
            continue  # the same record's cached rows read twice
        seen.add((cid, row))
        if keep_idx and ids[keep_idx[-1]] == cid:
            dup_idx.append(i)  # the same video listed again: its first row stands for it
            if captions[i] not in keep_captions[-1]:
                keep_captions[-1].append(captions[i])
        else:
            keep_idx.append(i)
            keep_captions.append([captions[i]])
    keep = ok.take(pa.array(keep_idx, pa.int64()))
    dups = ok.take(pa.array(dup_idx, pa.int64()))
    n_dup = dups.num_rows
    return pa.concat_tables([
        _with_plan(keep, KEEP, captions=pa.array(keep_captions, pa.list_(pa.string())),
                   done=pa.array([c in done_ids for c in keep.column("clip_id").to_pylist()], pa.bool_())),
        _with_plan(dups, DUP, kept_clip_id=dups.column("clip_id"), dup_kind=pa.array(["same_id"] * n_dup),
                   distance=pa.array([0.0] * n_dup)),
        _with_plan(quarantined, QUARANTINE),
    ])


def _rank_rows(table: pa.Table) -> list[dict]:
    return table.select(["clip_id", "source_width", "source_height", "source"]).to_pylist()


def exact_groups(table: pa.Table) -> pa.Table:
    """Kept PLAN rows of complete ``content_hash`` groups -> the best copy of each group (with every caption
    of the group) and the others as ``exact`` duplicates; other roles pass through."""
    table = _conform(table, PLAN_SCHEMA)
    is_keep = pc.equal(table.column("role"), KEEP)
    keep, other = table.filter(is_keep), table.filter(pc.invert(is_keep))
    groups: dict[str, list[int]] = defaultdict(list)
    for i, h in enumerate(keep.column("content_hash").to_pylist()):
        groups[h].append(i)
    if all(len(g) == 1 for g in groups.values()):
        return pa.concat_tables([keep, other])
    ranks = [dedup.copy_rank(r) for r in _rank_rows(keep)]
    captions = keep.column("captions").to_pylist()
    role, kept, kind = ["keep"] * keep.num_rows, [None] * keep.num_rows, [None] * keep.num_rows
    for members in groups.values():
        if len(members) < 2:
            continue
        members = sorted(members, key=lambda i: ranks[i])  # best copy first
        best = members[0]
        best_id = keep.column("clip_id")[best].as_py()
        merged = list(dict.fromkeys(c for i in members for c in captions[i]))  # kept id's captions first
        captions[best] = merged
        for i in members[1:]:
            role[i], kept[i], kind[i], captions[i] = DUP, best_id, "exact", None
    keep = _with_plan(keep, KEEP, role=pa.array(role, pa.string()), kept_clip_id=pa.array(kept, pa.string()),
                      dup_kind=pa.array(kind, pa.string()),
                      distance=pa.array([0.0 if k else None for k in kind], pa.float64()),
                      captions=pa.array(captions, pa.list_(pa.string())), done=keep.column("done"))
    return pa.concat_tables([keep, other])


def band_rows(table: pa.Table, bands: int = dedup.DEFAULT_BANDS) -> pa.Table:
    """Kept PLAN rows -> one row per (row, distinct band key of its full and centre hashes), without the footage
    hash, plus one row per footage key (:func:`fdreamer.data.footage.footage_keys`) of rows that have one, with it:
    ``band_key`` and the columns the near check needs (a row without a centre hash: its full hash's keys only)."""
    keep = _conform(table.filter(pc.equal(table.column("role"), KEEP)), pa.schema(list(BAND_SCHEMA)[:-1]))
    full = keep.column("phash").to_pylist()
    keys = dedup.band_values(full, bands)  # [N, bands]
    centers = keep.column("phash_center").to_pylist()
    has = np.array([bool(c) for c in centers], dtype=bool)
    ckeys = np.full_like(keys, -1)  # -1: no key (band values are >= 0)
    if has.any():
        ckeys[has] = dedup.band_values([c for c in centers if c], bands)
    both = np.sort(np.concatenate([keys, ckeys], axis=1), axis=1)  # [N, 2 * bands]
    valid = (both >= 0) & np.concatenate([np.ones((len(both), 1), bool), both[:, 1:] != both[:, :-1]], axis=1)
    row, col = np.nonzero(valid)  # each row once per distinct key
    clip_rows = keep.take(pa.array(row))
    clip_rows = clip_rows.set_column(clip_rows.schema.get_field_index("footage"), "footage",
                                     pa.nulls(clip_rows.num_rows, pa.binary()))  # not needed in those buckets
    f_row, f_key = [], []
    for n, f in enumerate(keep.column("footage").to_pylist()):
        for key in footage.footage_keys(f):
            f_row.append(n)
            f_key.append(key)
    return pa.concat_tables([
        clip_rows.append_column("band_key", pa.array(both[row, col], pa.int64())),
        keep.take(pa.array(f_row, pa.int64())).append_column("band_key", pa.array(f_key, pa.int64())),
    ])


def near_edges(table: pa.Table, threshold: float = dedup.DEFAULT_THRESHOLD, bands: int = dedup.DEFAULT_BANDS,
               max_bucket: int = 10_000) -> pa.Table:
    """Band rows of complete ``band_key`` buckets -> EDGE rows: verified pairs + one row of counts."""
    stats = dict.fromkeys(STAT_NAMES, 0)
    out: dict[str, list] = {f.name: [] for f in EDGE_SCHEMA}
    if table.num_rows:
        table = table.take(pc.sort_indices(table, [("band_key", "ascending"), ("clip_id", "ascending")]))
        keys = table.column("band_key").to_numpy()
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        ends = np.r_[starts[1:], len(keys)]
        phash = table.column("phash").to_pylist()
        center = table.column("phash_center").to_pylist()
        fhash = table.column("footage").to_pylist()
        cols = {c: table.column(c).to_pylist() for c in NODE_COLUMNS if c not in ("phash", "phash_center")}
        ids = cols["clip_id"]

        def emit(i: int, j: int, d: float) -> None:
            for side, k in (("a", i), ("b", j)):
                out[f"{side}_phash"].append(phash[k])
                out[f"{side}_phash_center"].append(center[k])
                for c, values in cols.items():
                    out[f"{side}_{c}"].append(values[k])
            out["distance"].append(d)
            for name in STAT_NAMES:
                out[name].append(0)

        for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
            if e - s < 2:
                continue
            key = int(keys[s])
            is_footage = bool(key & footage.FOOTAGE_KEY)
            cap = max(2, min(max_bucket, footage.FOOTAGE_MAX_BUCKET)) if is_footage else max_bucket
            stats["band_buckets"] += 1
            if e - s > cap:
                stats["oversized_buckets"] += 1
                stats["oversized_bucket_members"] += e - s
            if is_footage:  # the same footage (a trimmed copy): reported here unless a clip bucket reports it
                pairs, checked = footage.footage_pairs(fhash[s:e], threshold, max_bucket, ids[s:e])
                stats["pairs_checked"] += checked
                for i, j in ((a + s, b + s) for a, b in pairs):
                    vi, vj = _variants(phash[i], center[i]), _variants(phash[j], center[j])
                    d = dedup.variant_distance(vi, vj)
                    if d <= threshold and dedup.first_shared_key(vi, vj, bands) is not None:
                        continue  # a clip-hash pair: its clip bucket reports it
                    if min(set(footage.footage_keys(fhash[i])) & set(footage.footage_keys(fhash[j]))) == key:
                        emit(i, j, d)  # once: by the smallest footage key the pair shares
                continue
            ii, jj, dist, checked = dedup.bucket_near_pairs(phash[s:e], threshold, max_bucket, ids[s:e], center[s:e])
            stats["pairs_checked"] += checked
            for i, j, d in zip((ii + s).tolist(), (jj + s).tolist(), dist.tolist(), strict=True):
                if dedup.first_shared_key(_variants(phash[i], center[i]), _variants(phash[j], center[j]),
                                          bands) != key:
                    continue  # reported by the smallest band key the pair shares
                emit(i, j, d)
    for f in EDGE_SCHEMA:  # the counts row: no pair
        out[f.name].append(stats[f.name] if f.name in stats else None)
    return pa.Table.from_pydict(out, schema=EDGE_SCHEMA)


def _variants(phash: bytes, center: bytes | None) -> list[bytes]:
    return dedup.variants({"phash": phash, "phash_center": center})


def resolve_near(edges: pa.Table, threshold: float = dedup.DEFAULT_THRESHOLD) -> tuple[pa.Table, dict[str, int]]:
    """(``DROPPED_SCHEMA`` rows: each dropped clip id, the kept one, their distance and the kept hashes; summed
    counts) from all EDGE rows.

    Components of the edge graph; the best copy of each (:func:`fdreamer.data.dedup.copy_rank`) is kept.
    Memory: the edge table (~200 bytes per near pair, in Arrow) and a few integers and one rank per endpoint;
    no Python object per edge.
    """
    stats = {name: int(pc.sum(edges.column(name)).as_py() or 0) for name in STAT_NAMES}
    pairs = edges.filter(pc.is_valid(edges.column("a_clip_id")))
    if not pairs.num_rows:
        return DROPPED_SCHEMA.empty_table(), stats
    ends = pa.concat_tables([pairs.select([f"{side}_{c}" for c in NODE_COLUMNS]).rename_columns(list(NODE_COLUMNS))
                             for side in ("a", "b")])
    ids = pc.unique(ends.column("clip_id"))
    nodes = ends.take(pc.index_in(ids, value_set=ends.column("clip_id")))  # first row of each endpoint
    a = pc.index_in(pairs.column("a_clip_id"), value_set=ids).to_numpy()
    b = pc.index_in(pairs.column("b_clip_id"), value_set=ids).to_numpy()
    parent = np.arange(len(ids))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = int(parent[x])
        return x

    for i, j in zip(a.tolist(), b.tolist(), strict=True):
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    roots = np.array([find(i) for i in range(len(ids))], np.int64)
    order = np.argsort(roots, kind="stable")  # endpoints grouped by component
    starts = np.flatnonzero(np.r_[True, roots[order][1:] != roots[order][:-1]])
    cols = {c: nodes.column(c).to_pylist() for c in ("clip_id", "source_width", "source_height", "source")}
    members: list[int] = []
    keep: list[int] = []
    for s, e in zip(starts.tolist(), np.r_[starts[1:], len(order)].tolist(), strict=True):
        group = order[s:e].tolist()  # rank tuples live for one component at a time
        best = min(group, key=lambda i: dedup.copy_rank({c: values[i] for c, values in cols.items()}))
        members += [i for i in group if i != best]
        keep += [best] * (len(group) - 1)
    phash, center = nodes.column("phash").to_pylist(), nodes.column("phash_center").to_pylist()
    distance = [dedup.variant_distance(dedup.variants({"phash": phash[m], "phash_center": center[m]}),
                                       dedup.variants({"phash": phash[k], "phash_center": center[k]}))
                for m, k in zip(members, keep, strict=True)]
    m_idx, k_idx = pa.array(members, pa.int64()), pa.array(keep, pa.int64())
    return pa.table({"clip_id": nodes.column("clip_id").take(m_idx), "kept_clip_id": nodes.column("clip_id").take(k_idx),
                     "distance": pa.array(distance, pa.float64()),
                     "kind": pa.array([dedup.copy_kind(d, threshold) for d in distance], pa.string()),
                     "kept_phash": nodes.column("phash").take(k_idx),
                     "kept_phash_center": nodes.column("phash_center").take(k_idx)}, schema=DROPPED_SCHEMA), stats


def apply_near(table: pa.Table, dropped: pa.Table, threshold: float = dedup.DEFAULT_THRESHOLD) -> pa.Table:
    """PLAN rows -> kept rows in ``dropped`` (:func:`resolve_near`) become ``near`` or ``footage`` duplicates;
    their exact copies follow them to the component's kept copy (distance: their own hashes to the kept copy's,
    kind by :func:`fdreamer.data.dedup.copy_kind`)."""
    if not dropped.num_rows or not table.num_rows:
        return table
    table = _conform(table, PLAN_SCHEMA)
    role, kind = table.column("role"), pc.fill_null(table.column("dup_kind"), "")
    at = pc.index_in(table.column("clip_id"), value_set=dropped.column("clip_id"))  # row of the dropped table
    via = pc.index_in(table.column("kept_clip_id"), value_set=dropped.column("clip_id"))
    is_near = pc.fill_null(pc.and_(pc.equal(role, KEEP), pc.is_valid(at)), False)
    follows = pc.fill_null(pc.and_(pc.and_(pc.equal(role, DUP), pc.equal(kind, "exact")), pc.is_valid(via)), False)
    if not (pc.any(is_near).as_py() or pc.any(follows).as_py()):
        return table
    kept_of = dropped.column("kept_clip_id")
    follow_rows = np.flatnonzero(follows.to_numpy(zero_copy_only=False))
    distance = table.column("distance").to_numpy(zero_copy_only=False).astype(np.float64, copy=True)
    near_distance = dropped.column("distance").take(at).to_numpy(zero_copy_only=False)
    distance = np.where(is_near.to_numpy(zero_copy_only=False), near_distance, distance)
    via_rows = via.to_numpy(zero_copy_only=False)
    kinds = pc.if_else(is_near, dropped.column("kind").take(at), table.column("dup_kind")).to_pylist()
    for r in follow_rows.tolist():  # an exact copy of a dropped row: its own distance to the kept copy
        d = int(via_rows[r])
        kept_hashes = dedup.variants({"phash": dropped.column("kept_phash")[d].as_py(),
                                      "phash_center": dropped.column("kept_phash_center")[d].as_py()})
        own = dedup.variants({"phash": table.column("phash")[r].as_py(),
                              "phash_center": table.column("phash_center")[r].as_py()})
        distance[r] = dedup.variant_distance(own, kept_hashes)
        kinds[r] = dedup.copy_kind(distance[r], threshold)
    changed = pc.or_(is_near, follows)
    columns = {
        "role": pc.if_else(is_near, DUP, role),
        "kept_clip_id": pc.if_else(is_near, kept_of.take(at), pc.if_else(follows, kept_of.take(via),
                                                                          table.column("kept_clip_id"))),
        "dup_kind": pa.array(kinds, pa.string()),
        "distance": pa.array(distance, pa.float64(), mask=pc.invert(pc.or_(changed, pc.is_valid(
            table.column("distance")))).to_numpy(zero_copy_only=False)),
        "captions": pc.if_else(is_near, pa.scalar(None, pa.list_(pa.string())), table.column("captions")),
    }
    for name, values in columns.items():
        table = table.set_column(table.schema.get_field_index(name), name, values)
    return _conform(table, PLAN_SCHEMA)
