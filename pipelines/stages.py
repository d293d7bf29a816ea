"""The per-batch work of the preprocessing job: plain functions/classes on ``pyarrow.Table`` batches.

Ray Data calls these through ``map_batches`` (see :mod:`pipelines.job`); they never raise on a bad
video: failures become rows with ``status="quarantined"`` plus a ``reason`` from
:mod:`fdreamer.data.quarantine`. Tensors travel between stages as bytes + shape + dtype columns
(:func:`fdreamer.data.schema.tensor_to_columns`), so no Ray tensor extension type is involved.

Image records (``kind = image``, :mod:`fdreamer.data.images`) take the same path as 1-frame clips:
pass 1 decodes + resizes the image (same ``size`` / ``min_side``, clip id tag ``img-<size>``), pass 2
encodes it like a 1-frame video (latents ``[4, 1, h, w]``; first_latent, CLIP and T5 as for clips),
writes no flow (null) and a null ``motion_score`` (no motion is measured on one frame), fps 0.
After pass 1 an image row is recognised by ``num_frames == 1`` (video profiles need >= 2).

Text: the CLIP text columns always encode ``caption``; ``t5`` encodes the text chosen by the job's
``t5_caption`` option (:func:`fdreamer.data.schema.t5_text`: ``caption``, or ``motion_caption`` with
a fallback to ``caption`` for rows without one, flagged per row as ``t5_fallback`` and returned by
:func:`write_shard` so the driver counts them). Pass 1 reads no text, so its cache does not depend
on the option.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from fdreamer.data import dedup, flow, footage, quarantine, schema, shots, storage
from pipelines import ledger
from fdreamer.data.images import read_image
from fdreamer.data.fetch import FetchConfig, prefetch
from fdreamer.data.sources import is_remote, open_source
from fdreamer.data.video import (
    VideoClip,
    VideoDecodeError,
    clip_fps,
    decode_frames,
    footage_indices,
    probe_video,
    read_video,
    resize_center_crop,
    sample_frame_indices,
)

OK, QUARANTINED = "ok", "quarantined"
logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise DecodeTimeoutError after ``seconds`` (main thread only; a no-op elsewhere or at 0)."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise quarantine.DecodeTimeoutError(f"decoding took longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def fetch_settings(fetch: dict | None) -> tuple[FetchConfig, int]:
    """(the fetch config, videos fetched ahead of the decoder) from the job's ``fetch`` dict
    (:class:`pipelines.config.PreprocessConfig`'s ``fetch`` fields plus ``ahead``)."""
    fetch = dict(fetch or {})
    ahead = int(fetch.pop("ahead", 4))
    return FetchConfig(**fetch), ahead


def _sources(uris: list[str], s3_endpoint: str | None,
             fetch: dict | None) -> Iterator[tuple[str, str | bytes | BaseException]]:
    """``(uri, what the decoder reads or the error reading it)`` for each uri in order; remote ones
    (S3, http(s), members of remote shards) are fetched ``ahead`` videos in advance, in threads, so the
    transfer of the next videos overlaps the decode of this one (:func:`fdreamer.data.fetch.prefetch`)."""
    cfg, ahead = fetch_settings(fetch)
    depth = ahead if any(is_remote(u) for u in uris) else 0
    yield from prefetch(uris, lambda u: open_source(u, s3_endpoint, cfg), depth)


def _sampling(profile: dict) -> dict:
    return {"fps": profile["fps"]} if profile.get("fps") is not None else {"stride": profile["stride"]}


def _is_image_row(row: dict) -> bool:
    """A pass-1/2 row of an image record (video profiles have num_frames >= 2)."""
    return int(row["num_frames"]) == 1


def _image_tag(profile: dict) -> str:
    return f"img-{profile['size']}"


def _base_row(rec: dict, profile: dict) -> dict:
    if rec.get("kind") == "image":
        profile = profile | {"num_frames": 1, "tag": _image_tag(profile)}
    return {
        "clip_id": schema.make_clip_id(rec["source"], rec["video_id"], 0, profile["num_frames"], profile["tag"]),
        "source": rec["source"], "video_id": rec["video_id"], "uri": rec["uri"], "caption": rec["caption"],
        "motion_caption": rec["motion_caption"], "split": rec.get("split") or "", "motion": rec.get("motion") or "",
        "record_key": rec.get("record_key") or "", "sec_hash": 0.0, "fps": 0.0, "source_width": int(rec.get("width") or 0),
        "source_height": int(rec.get("height") or 0), "num_frames": profile["num_frames"], "start_frame": 0,
        "content_hash": "", "phash": b"", "phash_center": b"", "footage": b"", "shot_cuts": 0,
        "shot_dropped_frames": 0, "status": OK, "reason": "",
        "detail": "",
    }


def _video_rows(src: str | bytes, rec: dict, base: dict, profile: dict) -> list[dict]:
    """Pass 1 of a video record: one row per sampled clip with its hashes (raises on a bad video).

    Clip positions lie inside shots (:func:`fdreamer.data.shots.clip_starts`; with no cut, or with
    ``shot_threshold`` null, the fixed positions ``k * span``). Cut detection needs every frame at hash size;
    a video of at most :data:`HELD_FRAMES` frames is decoded once and its clips and footage hashed from those
    frames, a longer one is decoded for the cuts and then again per clip (bounded memory).
    """
    info = probe_video(src)
    quarantine.check_size(info, int(profile["min_side"]))
    first = sample_frame_indices(info.num_frames, info.fps, profile["num_frames"], **_sampling(profile))
    span = first[-1] + 1
    held = None  # [N, h, w, 3] every frame at hash size, when cut detection decoded and kept them
    cuts: list[int] = []
    if profile.get("shot_threshold"):
        cfg = shots.ShotConfig(threshold=float(profile["shot_threshold"]),
                               min_shot_frames=int(profile.get("min_shot_frames", 15)))
        if info.num_frames <= HELD_FRAMES:
            held = decode_frames(src, list(range(info.num_frames)), decode_side=dedup.HASH_SIDE, info=info)
            cuts = shots.detect_cuts(held, info.fps, cfg)
        else:
            cuts = shots.video_cuts(src, info, cfg, side=dedup.HASH_SIDE)
    starts, stats = shots.clip_starts(info.num_frames, cuts, span, int(profile["clips_per_video"]))
    if not starts:
        raise VideoDecodeError(f"clip too short: no shot of the video holds a {span}-frame clip "
                               f"({info.num_frames} frames, cuts at {cuts})")
    rows = []
    for k, start in enumerate(starts):
        clip = hash_clip(src, profile, start, info, held)
        rows.append(base | {
            "clip_id": schema.make_clip_id(rec["source"], rec["video_id"], start, profile["num_frames"],
                                           profile["tag"]),
            "fps": clip.fps, "source_width": info.width, "source_height": info.height,
            "start_frame": start, **dedup.clip_hashes(clip.frames),
            # the video's footage hash, on its first clip only (a footage match drops that clip, not the others)
            "footage": footage_of(src, info, held) if k == 0 else b"",
            # the video's shot counts, on its first clip only (summed into summary.json's shots)
            "shot_cuts": stats.cuts if k == 0 else 0, "shot_dropped_frames": stats.dropped_frames if k == 0 else 0,
        })
    return rows


HELD_FRAMES = 3600  # ~79 MB of 16:9 frames at hash size (2 min at 30 fps): decoded once in pass 1 when shorter


def footage_of(src: str | bytes, info: Any, held: np.ndarray | None = None) -> bytes:
    """The video's footage hash (:func:`fdreamer.data.footage.footage_hash`): its frames at
    ``footage.FOOTAGE_FPS`` from the start, at most ``footage.FOOTAGE_FRAMES``, decoded at ``dedup.HASH_SIDE``
    (taken from ``held``, every frame at that size, when pass 1 has them)."""
    indices = footage_indices(info, footage.FOOTAGE_FPS, footage.FOOTAGE_FRAMES)
    if len(indices) < 2:
        return b""
    frames = held[indices] if held is not None else decode_frames(src, indices, decode_side=dedup.HASH_SIDE,
                                                                    info=info)
    return footage.footage_hash(resize_center_crop(frames, dedup.HASH_SIDE))


def hash_clip(src: str | bytes, profile: dict, start: int, info: Any = None, held: np.ndarray | None = None) -> Any:
    """The clip at ``start`` as pass 1 hashes it: the profile's frames, decoded straight to
    :data:`fdreamer.data.dedup.HASH_SIDE` (the decoder scales; no frame at the profile's size is made), or
    taken from ``held`` (every frame of the video at that size, when pass 1 has them: the same frames)."""
    if held is None:
        return read_video(src, profile["num_frames"], start_frame=start, size=dedup.HASH_SIDE,
                          decode_side=dedup.HASH_SIDE, info=info, **_sampling(profile))
    indices = sample_frame_indices(info.num_frames, info.fps, profile["num_frames"], start_frame=start,
                                   **_sampling(profile))
    return VideoClip(frames=resize_center_crop(held[indices], dedup.HASH_SIDE),
                     fps=clip_fps(info, **_sampling(profile)), indices=indices, source=info)


def _image_rows(src: str | bytes, rec: dict, base: dict, profile: dict) -> list[dict]:
    """Pass 1 of an image record: one 1-frame row (``base`` has its id) with its hashes (raises on a bad image)."""
    frames, info = read_image(src, dedup.HASH_SIDE)  # [1, S, S, 3]
    quarantine.check_size(info, int(profile["min_side"]))
    return [base | {"source_width": info.width, "source_height": info.height, **dedup.clip_hashes(frames)}]


def hash_videos(batch: pa.Table, profile: dict, s3_endpoint: str | None = None, fetch: dict | None = None) -> pa.Table:
    """Manifest records -> one row per sampled clip with its hashes, or one quarantine row per video.

    Output columns: :data:`HASH_SCHEMA` (the metadata of the schema plus ``record_key`` of the
    manifest record, ``sec_hash`` (seconds spent on the video, split over its clips; a fetch overlapped
    with the previous decode is not counted), ``phash`` (bytes), ``status``, ``reason``, ``detail``). No
    frames leave this stage: the table stays small. Image records give one 1-frame row (module docstring).
    A failed fetch is a quarantine row with the fetch's reason (``http_404``, ``timeout``, ...).
    """
    out: list[dict] = []
    records = batch.to_pylist()
    for rec, (_, src) in zip(records, _sources([r["uri"] for r in records], s3_endpoint, fetch), strict=True):
        t0 = time.perf_counter()
        base = _base_row(rec, profile)
        try:
            if isinstance(src, BaseException):
                raise src
            with _time_limit(float(profile.get("decode_timeout_s") or 0)):
                rows = (_image_rows if rec.get("kind") == "image" else _video_rows)(src, rec, base, profile)
        except (VideoDecodeError, OSError, ValueError) as exc:
            reason = quarantine.classify(exc, int(profile["min_side"])) or "corrupt"
            rows = [base | {"status": QUARANTINED, "reason": reason, "detail": f"{type(exc).__name__}: {exc}"[:500]}]
        except Exception as exc:  # noqa: BLE001 - any other failure of one video must not stop the job
            rows = [base | {"status": QUARANTINED, "reason": "corrupt", "detail": f"{type(exc).__name__}: {exc}"[:500]}]
        sec = (time.perf_counter() - t0) / max(len(rows), 1)
        out += [r | {"sec_hash": sec} for r in rows]
    return pa.Table.from_pylist(out, schema=HASH_SCHEMA)


# The clip metadata known after pass 1 (``captions`` is set by the driver's dedup, the rest by pass 2).
HASH_SCHEMA = pa.schema([f for f in schema.METADATA_FIELDS
                         if f.name not in ("captions", "motion_score", "t5_length", "schema_version")]
                        + [pa.field("record_key", pa.string()), pa.field("sec_hash", pa.float64()),
                           pa.field("phash", pa.binary()), pa.field("phash_center", pa.binary()),
                           pa.field("footage", pa.binary()), pa.field("shot_cuts", pa.int32()),
                           pa.field("shot_dropped_frames", pa.int32()), pa.field("status", pa.string()),
                           pa.field("reason", pa.string()), pa.field("detail", pa.string())])

# Quarantine reasons that may change on a rerun (the object may appear, the machine or the server may be
# less loaded, a network fault may pass): their pass-1 results are not cached, so a rerun tries those
# videos again. A 404, a 4xx, a size over the cap or a TLS failure stays what it is: cached.
TRANSIENT_REASONS = frozenset({"missing", "decode_timeout", "timeout", "connection_failed", "http_5xx_after_retries",
                               "truncated"})


# Record fields that label a video without changing what pass 1 computes from it: they stay out of the
# cache key and are re-joined from the current manifest record, so re-captioning decodes nothing again.
LABEL_FIELDS = ("caption", "motion_caption", "split", "motion")


def record_key(rec: dict, profile: dict) -> str:
    """Key of one manifest record under one sampling profile (the pass-1 cache key).

    The video's identity (``uri``, ``source``, ``video_id``, the manifest's ``width``/``height``), the
    sampling profile and :data:`fdreamer.data.dedup.HASH_VERSION` (hashes of another version are not reused);
    not its labels (:data:`LABEL_FIELDS`). ``kind`` enters the key only for images.
    An object replaced under the same uri keeps its key: write changed videos under a new uri.
    """
    prof = {k: v for k, v in sorted(profile.items()) if k != "decode_timeout_s"}
    skip = {"record_key", *LABEL_FIELDS} | ({"kind"} if rec.get("kind", "video") == "video" else set())
    text = json.dumps({"record": {k: rec[k] for k in sorted(rec) if k not in skip}, "profile": prof,
                       "hash_version": dedup.HASH_VERSION}, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()


def hash_and_cache(batch: pa.Table, profile: dict, output: str, s3_endpoint: str | None = None,
                   hasher: Callable[..., pa.Table] | None = None, fetch: dict | None = None) -> pa.Table:
    """:func:`hash_videos`, then persist the block's results under ``<output>/_hashes/`` (atomic).

    A rerun reads these files and hashes only the records (by ``record_key``) not found there, so
    it does not decode every video again. Transient failures (:data:`TRANSIENT_REASONS`) are not
    persisted.
    """
    # hasher: the dedup benchmark's synthetic hashes
    table = hasher(batch, profile, s3_endpoint) if hasher else hash_videos(batch, profile, s3_endpoint, fetch)
    keep = [s != QUARANTINED or r not in TRANSIENT_REASONS
            for s, r in zip(table.column("status").to_pylist(), table.column("reason").to_pylist())]
    cached = table.filter(pa.array(keep, pa.bool_()))
    if cached.num_rows:
        fs, base = storage.resolve(output, s3_endpoint)
        name = part_name(cached.column("record_key").to_pylist())
        storage.write_parquet(fs, storage.join(base, HASH_DIR, name), cached, compression="zstd")
    return table


HASH_DIR = "_hashes"


def part_name(keys: list[str]) -> str:
    """``part-<sha1 of the sorted keys, 20 hex>.parquet``: a file's name follows from the rows it holds.

    A retried or lineage-rebuilt task that writes the same rows again replaces its file instead of
    adding a second copy; two runs whose batches form alike name (and so order) their files alike.
    """
    digest = hashlib.sha1("\n".join(sorted(keys)).encode()).hexdigest()[:20]
    return f"part-{digest}.parquet"


def decode_clips(batch: pa.Table, profile: dict, s3_endpoint: str | None = None,
                 flow_size: tuple[int, int] | None = None, fetch: dict | None = None) -> pa.Table:
    """Kept clips -> the same rows plus ``frames`` (uint8 ``[T, S, S, 3]`` as bytes/shape/dtype) and, with
    ``flow_size`` (the latents' ``(h, w)``), their optical flow and ``motion_score`` (:func:`_add_flow`),
    computed beside the decode so the frames are decoded once and cross no other stage for it.

    Failures (``decode_timeout_s`` applies here too, and a failed fetch) become quarantine rows with their
    reason. The clips of one video in the batch share one read of it (rows arrive in the plan's order, a
    video's clips side by side).
    """
    rows = batch.to_pylist()
    last = {r["uri"]: i for i, r in enumerate(rows)}  # a video's bytes are dropped after its last clip
    sources = _sources(list(dict.fromkeys(r["uri"] for r in rows)), s3_endpoint, fetch)
    held: dict[str, str | bytes | BaseException] = {}
    for i, r in enumerate(rows):
        t0 = time.perf_counter()
        frames = np.zeros((0, 0, 0, 3), np.uint8)
        while r["uri"] not in held:  # videos arrive in first-appearance order
            uri, got = next(sources)
            held[uri] = got
        src = held.pop(r["uri"]) if last[r["uri"]] == i else held[r["uri"]]
        try:
            if isinstance(src, BaseException):
                raise src
            with _time_limit(float(profile.get("decode_timeout_s") or 0)):
                if _is_image_row(r):
                    frames, _ = read_image(src, profile["size"])  # [1, S, S, 3]
                else:
                    clip = read_video(src, profile["num_frames"], start_frame=r["start_frame"],
                                      size=profile["size"], **_sampling(profile))
                    frames = clip.frames
        except Exception as exc:  # noqa: BLE001 - rare (the hash pass read it); recorded, never raised
            r.update(status=QUARANTINED, reason=quarantine.classify(exc) or "corrupt", detail=str(exc)[:500])
        r.update(schema.tensor_to_columns("frames", frames))
        r["sec_decode"] = time.perf_counter() - t0
        if flow_size is not None:
            _add_flow(r, frames, flow_size)
    table = pa.Table.from_pylist(rows)
    if flow_size is not None:
        for name, typ in _FLOW_TYPES.items():  # typed even when every row is null (a block of only images)
            table = table.set_column(table.schema.get_field_index(name), name, table.column(name).cast(typ))
    return table


def _add_flow(r: dict, frames: np.ndarray, size: tuple[int, int]) -> None:
    """``r`` += ``flow`` ``[2, T-1, h, w]`` at ``size`` and ``motion_score``; null for failures and images
    (no flow on one frame; a null motion score = not measured)."""
    t0 = time.perf_counter()
    r.update({"flow": None, "flow_shape": None, "flow_dtype": None, "motion_score": 0.0, "sec_flow": 0.0})
    if r["status"] != OK:
        return
    if _is_image_row(r):
        r["motion_score"] = None
        return
    fl = flow.optical_flow(frames, size)
    r.update(schema.tensor_to_columns("flow", fl))
    r["motion_score"] = flow.motion_score(fl)
    r["sec_flow"] = time.perf_counter() - t0


_FLOW_TYPES = {"flow": pa.binary(), "flow_shape": pa.list_(pa.int32()), "flow_dtype": pa.string(),
               "motion_score": pa.float32()}


def _ok_rows(rows: list[dict]) -> list[int]:
    return [i for i, r in enumerate(rows) if r["status"] == OK]


class EncodeClips:
    """Actor: loads the frozen encoders once, then adds latents, first_latent, CLIP and T5 columns.

    ``t5_caption`` chooses the text of ``t5`` (module docstring); CLIP always encodes ``caption``.
    """

    def __init__(self, encoder_cfg: dict, t5_caption: str = "caption") -> None:
        schema.t5_text({"caption": ""}, t5_caption)  # an unknown option fails here, before loading models
        self.t5_caption = t5_caption
        self.enc = load_encoders(encoder_cfg)

    def __call__(self, batch: pa.Table) -> pa.Table:
        t0 = time.perf_counter()
        rows = batch.to_pylist()
        ok = _ok_rows(rows)
        empty = {n: None for n in ("latents", "first_latent", "clip_image_embed", "clip_text_embed",
                                   "clip_text_tokens", "t5")}
        for r in rows:
            for name in empty:
                r.update({name: None, f"{name}_shape": None, f"{name}_dtype": None})
            r["t5_length"], r["t5_fallback"] = 0, False
        groups: dict[int, list[int]] = {}  # clips and 1-frame images are encoded in separate groups
        for i in ok:
            groups.setdefault(int(rows[i]["frames_shape"][0]), []).append(i)
        for group in groups.values():
            self._encode(rows, group)
        sec = (time.perf_counter() - t0) / max(len(rows), 1)
        for r in rows:
            r["sec_encode"] = sec
        return pa.Table.from_pylist(rows).drop_columns(["frames", "frames_shape", "frames_dtype"])

    def _encode(self, rows: list[dict], ok: list[int]) -> None:
        """Add the encoder columns to ``rows[i]`` for ``i in ok`` (all with the same frame count)."""
        if ok:
            frames = np.stack([schema.columns_to_tensor(rows[i], "frames") for i in ok])  # [B, T, S, S, 3]
            captions = [rows[i]["caption"] for i in ok]
            lat = self.enc.encode_video(frames).float().cpu().numpy().astype(np.float16)  # [B, 4, T, h, w]
            img = self.enc.encode_clip_image(frames[:, 0]).float().cpu().numpy().astype(np.float16)  # [B, P]
            txt = self.enc.encode_clip_text_embeds(captions).float().cpu().numpy().astype(np.float16)  # [B, P]
            tok = self.enc.encode_clip_text_tokens(captions).float().cpu().numpy().astype(np.float16)  # [B, 77, Dc]
            t5_texts = [schema.t5_text(rows[i], self.t5_caption) for i in ok]  # (text, fell back to caption)
            t5 = self.enc.encode_t5_unpadded([text for text, _ in t5_texts])  # B x [L_i, D]
            for j, i in enumerate(ok):
                r = rows[i]
                r.update(schema.tensor_to_columns("latents", lat[j]))
                r.update(schema.tensor_to_columns("first_latent", np.ascontiguousarray(lat[j][:, 0])))
                r.update(schema.tensor_to_columns("clip_image_embed", img[j]))
                r.update(schema.tensor_to_columns("clip_text_embed", txt[j]))
                r.update(schema.tensor_to_columns("clip_text_tokens", tok[j]))
                t5_j = t5[j].float().cpu().numpy().astype(np.float16)
                r.update(schema.tensor_to_columns("t5", t5_j))
                r["t5_length"] = int(t5_j.shape[0])
                r["t5_fallback"] = t5_texts[j][1]


ENCODER_COMPONENTS = ("vae", "clip_text", "t5", "clip")


def load_encoders(encoder_cfg: dict) -> Any:
    """The frozen encoders the job needs (VAE, SD CLIP text, T5, CLIP), loaded now."""
    import torch

    from fdreamer.encoders import EncoderConfig, FrozenEncoders

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    return FrozenEncoders.load(EncoderConfig(**encoder_cfg), components=ENCODER_COMPONENTS)


def null_conditions(enc: Any) -> dict[str, Any]:
    """Encodings of the empty caption (CFG null condition): fp16 CPU tensors, see ``schema``."""
    import torch

    def half(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", torch.float16).contiguous()

    return {
        "clip_text_tokens": half(enc.encode_clip_text_tokens([""])[0]),  # [L_c, D_c], padded like the column
        "t5": half(enc.encode_t5_unpadded([""])[0]),  # [L5, D], unpadded
        "clip_text_embed": half(enc.encode_clip_text_embeds([""])[0]),  # [P]
    }


def null_conditions_bytes(encoder_cfg: dict) -> bytes:
    """:func:`null_conditions` serialised with safetensors (run as a Ray task with the encode resources)."""
    from safetensors.torch import save

    return save(null_conditions(load_encoders(encoder_cfg)), metadata={"caption": "",
                                                                       "schema_version": str(schema.SCHEMA_VERSION)})


WRITE_SCHEMA = pa.schema([("clip_id", pa.string()), ("uri", pa.string()), ("status", pa.string()),
                          ("reason", pa.string()), ("detail", pa.string()), ("shard", pa.string()),
                          ("t5_fallback", pa.bool_()),
                          *[(f"sec_{k}", pa.float64()) for k in ("decode", "encode", "flow", "write")],
                          ("ledger", pa.string())])


def write_shard(batch: pa.Table, output: str, s3_endpoint: str | None = None, t5_caption: str = "caption") -> pa.Table:
    """Write the ok rows as one Parquet shard ``<output>/shards/part-*.parquet``; one row per input.

    Local: temp name then rename; S3: one upload of the final key (atomic, see
    :mod:`fdreamer.data.storage`). A reader never sees a partial shard. ``t5_caption`` (what the
    ``t5`` column encodes) goes into the shard's metadata (:data:`fdreamer.data.schema.T5_CAPTION_META`).
    Returned columns: :data:`WRITE_SCHEMA` (``shard`` is empty for rows not written; ``t5_fallback``
    true for written rows whose T5 fell back to ``caption``; ``sec_*`` the seconds each stage spent
    per row; ``ledger``: the shard's :mod:`pipelines.ledger` row as JSON, on its first row only).
    """
    t0 = time.perf_counter()
    rows = batch.to_pylist()
    good = [dict(r, schema_version=schema.SCHEMA_VERSION, captions=r.get("captions") or [r["caption"]])
            for r in rows if r["status"] == OK]  # a row without exact copies: its own caption only
    name, record = "", None
    if good:
        fs, base = storage.resolve(output, s3_endpoint)
        name = part_name([r["clip_id"] for r in good])
        footer: list = []
        storage.write_parquet(fs, storage.join(base, "shards", name), schema.rows_to_table(good, t5_caption),
                              compression="zstd", metadata_collector=footer)
        record = json.dumps(ledger.entry(name, footer[0]))
    sec_write = (time.perf_counter() - t0) / max(len(rows), 1)
    first_ok = next((i for i, r in enumerate(rows) if r["status"] == OK), -1)
    return pa.Table.from_pylist([
        {"clip_id": r["clip_id"], "uri": r["uri"], "status": r["status"], "reason": r["reason"],
         "detail": r["detail"], "shard": name if r["status"] == OK else "",
         "t5_fallback": bool(r.get("t5_fallback")) and r["status"] == OK,
         "sec_decode": r.get("sec_decode") or 0.0, "sec_encode": r.get("sec_encode") or 0.0,
         "sec_flow": r.get("sec_flow") or 0.0, "sec_write": sec_write,
         "ledger": record if i == first_ok else None}
        for i, r in enumerate(rows)
    ], schema=WRITE_SCHEMA)
