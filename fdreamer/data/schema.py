"""Parquet schema of preprocessed clips (one row per sampled clip), readable by plain pyarrow/pandas.

Tensors are stored as three columns each, so no Ray or custom extension type is needed to read them:

- ``<name>``: ``binary``, the C-order bytes of the array,
- ``<name>_shape``: ``list<int32>``, its shape,
- ``<name>_dtype``: ``string``, its numpy dtype name (``float16`` for every tensor written here).

Tensor columns (T sampled frames, h x w latent resolution, P CLIP projection size, D T5 width,
L_c the SD tokenizer length, D_c the SD text encoder width):

=================== ================= ==================================================
column              shape             meaning
=================== ================= ==================================================
latents             [4, T, h, w]      VAE posterior mean times the scaling factor
first_latent        [4, h, w]         ``latents[:, 0]`` (image condition)
clip_image_embed    [P]               CLIP image embedding of the first frame
clip_text_embed     [P]               CLIP text embedding of the caption
clip_text_tokens    [L_c, D_c]        SD text encoder last hidden state of the caption,
                                      PADDED to the tokenizer length (SD conditions on
                                      all 77 positions); the spatial UNet's
                                      cross-attention input (schema v2)
t5                  [L, D]            T5 hidden states, UNPADDED (L = ``t5_length``)
flow                [2, T-1, h, w]    optical flow (dx, dy) at latent resolution, latent px
=================== ================= ==================================================

All tensors are float16. Sizes per clip before compression at sd15 / stage 2 (16x512x512, 64x64
latents): latents 512 KB, flow 240 KB, ``clip_text_tokens`` 77 x 768 x 2 B = 118 KB, T5-XXL
~20 tokens x 4096 x 2 B = 160 KB (padded to 120 it would be ~1 MB), first latent 32 KB, the two
CLIP embeddings 1.5 KB each. The tiny preset's ``clip_text_tokens`` is 77 x 32 (4.9 KB).

Metadata columns are listed in :data:`METADATA_FIELDS`. ``caption`` is the caption the CLIP text
tensors (``clip_text_embed``, ``clip_text_tokens``) encode, and ``t5`` too by default.
``motion_caption`` is the manifest's concise motion description (empty when it has none: WebVid and
Pexels CSVs, generic manifests without the column). The job's ``t5_caption`` option chooses the text
of ``t5``: ``caption`` (default), or ``motion_caption``, where a row with an empty motion caption
falls back to ``caption`` (:func:`t5_text` is the rule). Each shard records the option in its
Parquet metadata under :data:`T5_CAPTION_META` (:func:`shard_t5_caption`; absent = ``caption``, as
written before the option existed), so a reader can tell what ``t5`` encodes without a new column
or schema version. ``captions`` (``list<string>``) holds every distinct caption given for the clip's
exact-duplicate group (the same frames listed under other ids, or the same video listed twice),
``caption`` first (:func:`fdreamer.data.dedup.exact_captions`), so no user-supplied caption is lost
when copies are dropped. ``clip_id`` is deterministic
(:func:`make_clip_id`) so reruns and resumes can skip clips already written. ``split`` and
``motion`` are free-form metadata copied from a generic manifest's columns of the same name when
present (the sample data's ``manifest.jsonl`` has ``split`` = train | heldout and the commanded
``motion``), else the empty string; the pipeline never interprets them.

Image rows (an image manifest, :mod:`fdreamer.data.images`) use the same schema as 1-frame clips:
``num_frames`` = 1 (video profiles need >= 2, so this identifies them), ``latents`` ``[4, 1, h, w]``,
``flow`` / ``flow_shape`` / ``flow_dtype`` null, ``motion_score`` null (not measured), ``fps`` 0.

Schema versions: 1 = the first release; 2 adds ``clip_text_tokens``, ``split`` and ``motion`` (image
rows need no new version: every value fits the v2 types); 3 adds ``captions``.

Beside the shards, a job writes ``null_conditions.safetensors`` (the encodings of the empty
caption, for classifier-free guidance; :func:`read_null_conditions`) and ``summary.json``
(:func:`read_summary`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 3

TENSOR_COLUMNS: tuple[str, ...] = (
    "latents", "first_latent", "clip_image_embed", "clip_text_embed", "clip_text_tokens", "t5", "flow",
)
# Number of dimensions of each tensor column (checked on write and read).
TENSOR_NDIM: dict[str, int] = {
    "latents": 4, "first_latent": 3, "clip_image_embed": 1, "clip_text_embed": 1, "clip_text_tokens": 2, "t5": 2,
    "flow": 4,
}

METADATA_FIELDS: tuple[pa.Field, ...] = (
    pa.field("clip_id", pa.string(), nullable=False),
    pa.field("source", pa.string()),  # webvid | pexels | generic
    pa.field("video_id", pa.string()),
    pa.field("uri", pa.string()),
    pa.field("caption", pa.string()),  # the caption the text tensors encode
    pa.field("captions", pa.list_(pa.string())),  # every distinct caption of the exact-duplicate group, caption first
    pa.field("motion_caption", pa.string()),
    pa.field("split", pa.string()),  # free-form, from a generic manifest (e.g. train | heldout), else ""
    pa.field("motion", pa.string()),  # free-form, from a generic manifest, else ""
    pa.field("fps", pa.float32()),  # effective fps of the sampled frames
    pa.field("source_width", pa.int32()),
    pa.field("source_height", pa.int32()),
    pa.field("num_frames", pa.int32()),  # T
    pa.field("start_frame", pa.int32()),  # first sampled source frame
    pa.field("content_hash", pa.string()),  # container-independent exact hash (dedup.content_hash)
    pa.field("motion_score", pa.float32()),  # mean flow magnitude, latent px / frame
    pa.field("t5_length", pa.int32()),
    pa.field("schema_version", pa.int32()),
)


# The manifest text the ``t5`` column encodes (the job's ``t5_caption`` option), kept in each shard's
# Parquet key-value metadata; shards without the key were written with ``caption``.
T5_CAPTION_FIELDS: tuple[str, ...] = ("caption", "motion_caption")
T5_CAPTION_META = b"fdreamer.t5_caption"


class SchemaError(ValueError):
    """A row or table does not match the clip schema."""


def make_clip_id(source: str, video_id: str, start_frame: int, num_frames: int, stride_tag: str) -> str:
    """Deterministic id of a sampled clip: ``<source>-<video_id>-<start>-<T>-<12 hex>``.

    The hash covers all inputs (including ``stride_tag``, e.g. ``fps8`` or ``s2``) so two sampling
    profiles of the same video never collide; the readable prefix helps debugging.
    """
    key = f"{source}|{video_id}|{start_frame}|{num_frames}|{stride_tag}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    safe_vid = "".join(c if c.isalnum() or c in "_." else "_" for c in str(video_id))[:40]
    return f"{source}-{safe_vid}-{start_frame}-{num_frames}-{digest}"


def t5_text(row: Mapping[str, Any], t5_caption: str = "caption") -> tuple[str, bool]:
    """(text T5 encodes for ``row``, whether it fell back to ``caption``) under the ``t5_caption`` option.

    ``motion_caption`` takes the row's ``motion_caption`` unless it is empty (or only whitespace),
    then its ``caption`` with ``fell_back = True``; ``caption`` always takes the caption.
    """
    if t5_caption not in T5_CAPTION_FIELDS:
        raise SchemaError(f"t5_caption must be one of {list(T5_CAPTION_FIELDS)}, got {t5_caption!r}")
    if t5_caption == "caption":
        return str(row["caption"]), False
    motion = str(row.get("motion_caption") or "")
    return (motion, False) if motion.strip() else (str(row["caption"]), True)


def shard_t5_caption(metadata: Mapping[bytes, bytes] | None) -> str:
    """The ``t5_caption`` a shard was written with, from its Parquet schema metadata (absent: ``caption``)."""
    value = (metadata or {}).get(T5_CAPTION_META, b"caption").decode()
    if value not in T5_CAPTION_FIELDS:
        raise SchemaError(f"shard metadata {T5_CAPTION_META.decode()}={value!r}: "
                          f"expected one of {list(T5_CAPTION_FIELDS)}")
    return value


def arrow_schema() -> pa.Schema:
    """The full Arrow schema: metadata fields then three columns per tensor."""
    fields = list(METADATA_FIELDS)
    for name in TENSOR_COLUMNS:
        fields += [pa.field(name, pa.binary()), pa.field(f"{name}_shape", pa.list_(pa.int32())),
                   pa.field(f"{name}_dtype", pa.string())]
    return pa.schema(fields, metadata={b"fdreamer.schema_version": str(SCHEMA_VERSION).encode()})


def tensor_to_columns(prefix: str, array: np.ndarray) -> dict[str, Any]:
    """``{prefix: bytes, prefix_shape: [..], prefix_dtype: "float16"}`` for one array."""
    if not isinstance(array, np.ndarray):
        raise SchemaError(f"{prefix}: expected a numpy array, got {type(array).__name__}")
    want = TENSOR_NDIM.get(prefix)
    if want is not None and array.ndim != want:
        raise SchemaError(f"{prefix}: expected {want} dimensions, got shape {list(array.shape)}")
    arr = np.ascontiguousarray(array)
    return {prefix: arr.tobytes(), f"{prefix}_shape": [int(s) for s in arr.shape], f"{prefix}_dtype": arr.dtype.name}


def decode_tensor(data: bytes, shape: Any, dtype: Any, name: str = "tensor") -> np.ndarray:
    """The one decoder of a tensor column value (raw bytes + shape + dtype; :func:`tensor_to_columns`)."""
    shape = tuple(int(s) for s in shape)
    arr = np.frombuffer(data, dtype=np.dtype(dtype))
    if arr.size != int(np.prod(shape)):
        raise SchemaError(f"{name}: {arr.size} values do not fill shape {list(shape)}")
    return arr.reshape(shape)


def columns_to_tensor(row: Mapping[str, Any], prefix: str) -> np.ndarray:
    """Inverse of :func:`tensor_to_columns` for a row (dict, pandas Series or pyarrow row dict)."""
    for key in (prefix, f"{prefix}_shape", f"{prefix}_dtype"):
        if key not in row:
            raise SchemaError(f"row has no column {key!r}")
    return decode_tensor(row[prefix], row[f"{prefix}_shape"], row[f"{prefix}_dtype"], prefix)


def check_row(row: Mapping[str, Any]) -> None:
    """Raise SchemaError unless ``row`` has every column of :func:`arrow_schema`."""
    missing = [n for n in arrow_schema().names if n not in row]
    if missing:
        raise SchemaError(f"row misses columns {missing}")


def rows_to_table(rows: list[Mapping[str, Any]], t5_caption: str = "caption") -> pa.Table:
    """Build a table with exactly :func:`arrow_schema` from complete rows.

    ``t5_caption`` (what the rows' ``t5`` encodes, :func:`t5_text`) goes into the schema metadata.
    """
    if t5_caption not in T5_CAPTION_FIELDS:
        raise SchemaError(f"t5_caption must be one of {list(T5_CAPTION_FIELDS)}, got {t5_caption!r}")
    for r in rows:
        check_row(r)
    schema = arrow_schema()
    schema = schema.with_metadata(schema.metadata | {T5_CAPTION_META: t5_caption.encode()})
    return pa.Table.from_pylist([{n: r[n] for n in schema.names} for r in rows], schema=schema)


# ------------------------------------------------------------------------------- job-level files
NULL_CONDITIONS_FILE = "null_conditions.safetensors"
NULL_CONDITION_KEYS: tuple[str, ...] = ("clip_text_tokens", "t5", "clip_text_embed")


def read_null_conditions(output: str, s3_endpoint: str | None = None) -> dict[str, Any]:
    """The empty caption's encodings written by the job: ``{name: torch.Tensor}`` (float16).

    ``clip_text_tokens`` ``[L_c, D_c]`` (padded like the column), ``t5`` ``[L5, D]`` (unpadded: the
    EOS token only for ""), ``clip_text_embed`` ``[P]``. Training uses them as the classifier-free
    guidance null condition. ``output`` is the job's output folder or ``s3://`` prefix.
    """
    from safetensors.torch import load

    from fdreamer.data import storage

    fs, base = storage.resolve(output, s3_endpoint)
    path = storage.join(base, NULL_CONDITIONS_FILE)
    if not storage.exists(fs, path):
        raise FileNotFoundError(f"{output}: no {NULL_CONDITIONS_FILE} (not a preprocessing output, or unfinished)")
    tensors = load(storage.read_bytes(fs, path))
    missing = [k for k in NULL_CONDITION_KEYS if k not in tensors]
    if missing:
        raise SchemaError(f"{path}: missing keys {missing}")
    return tensors


def read_summary(output: str, s3_endpoint: str | None = None, *, require_success: bool = True) -> dict[str, Any]:
    """The job's summary (``_SUCCESS``, or ``summary.json`` when ``require_success`` is false).

    ``_SUCCESS`` is written last with the same JSON, so reading it both checks that the job finished
    and returns its counts; FileNotFoundError otherwise.
    """
    from fdreamer.data import storage

    fs, base = storage.resolve(output, s3_endpoint)
    for name in ("_SUCCESS",) if require_success else ("_SUCCESS", "summary.json"):
        path = storage.join(base, name)
        if storage.exists(fs, path):
            return json.loads(storage.read_bytes(fs, path))
    raise FileNotFoundError(f"{output}: no _SUCCESS (the job has not finished there)")


def shard_paths(output: str, s3_endpoint: str | None = None) -> list[str]:
    """Complete shard files of an output (``shards/part-*.parquet``; temporaries skipped)."""
    from fdreamer.data import storage

    fs, base = storage.resolve(output, s3_endpoint)
    return storage.list_files(fs, storage.join(base, "shards"), "part-", ".parquet")
