"""Read clip manifests (WebVid CSV, Pexels-style CSV, generic Parquet/JSONL) from disk or ``s3://``.

Every reader returns a list of :class:`ManifestRecord` dicts with the same keys
(``uri, caption, motion_caption, source, video_id, width, height, split, motion, kind``). The format is detected
from the columns:

- WebVid: ``videoid, contentUrl, name`` (caption = ``name``),
- Pexels-style: ``id, url, title`` (caption = ``title``; ``width``/``height`` kept when present),
- generic: ``path, caption[, motion_caption, clip_id, source, width, height, split, motion]``;
  ``split`` and ``motion`` are free-form metadata carried into the output columns of the same
  name (empty strings when absent, and for the WebVid/Pexels formats).

``kind`` is ``video`` or ``image`` (:func:`fdreamer.data.images.record_kind`): a generic manifest's
``kind`` column when present and non-empty (``video`` | ``image``, anything else is a ManifestError),
else ``image`` when the path ends with .png/.jpg/.jpeg/.webp/.bmp, else ``video`` — so a manifest of
``path, caption`` rows pointing at PNG/JPEG files is an image manifest as it is. Image records without a
``source`` column get the source ``image``.

Anything else (no caption column, unreadable file, unknown URI scheme) raises :class:`ManifestError`
before any video is touched.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, TypedDict
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from fdreamer.data.images import record_kind

SCHEMES = ("", "file", "s3")


class ManifestError(ValueError):
    """A manifest cannot be read or its columns are not a known format."""


class ManifestRecord(TypedDict):
    uri: str
    caption: str
    motion_caption: str
    source: str
    video_id: str
    width: int
    height: int
    split: str
    motion: str
    kind: str  # video | image


def _s3_client(endpoint: str | None) -> Any:
    import boto3  # imported lazily: local-only runs never need it

    return boto3.client("s3", endpoint_url=endpoint or None)


def read_bytes(uri: str, s3_endpoint: str | None = None) -> bytes:
    """The bytes behind a local path, ``file://`` or ``s3://bucket/key`` URI.

    Raises FileNotFoundError when the object does not exist and ManifestError for other schemes.
    """
    parsed = urlparse(str(uri))
    scheme = parsed.scheme if len(parsed.scheme) > 1 else ""  # "C:" style drive letters are paths
    if scheme not in SCHEMES:
        raise ManifestError(f"{uri}: unsupported URI scheme {scheme!r}; expected a path, file:// or s3://")
    if scheme == "s3":
        client = _s3_client(s3_endpoint)
        try:
            return client.get_object(Bucket=parsed.netloc, Key=parsed.path.lstrip("/"))["Body"].read()
        except client.exceptions.NoSuchKey as exc:
            raise FileNotFoundError(f"{uri}: no such S3 object") from exc
    path = Path(parsed.path if scheme == "file" else str(uri))
    return path.read_bytes()


def _read_table(uri: str, s3_endpoint: str | None) -> pa.Table:
    try:
        data = read_bytes(uri, s3_endpoint)
    except ManifestError:
        raise
    except Exception as exc:  # missing file, permissions, S3 errors: all fatal for a manifest
        raise ManifestError(f"cannot read manifest {uri}: {type(exc).__name__}: {exc}") from exc
    name = urlparse(uri).path.lower()
    try:
        if name.endswith(".parquet"):
            return pq.read_table(io.BytesIO(data))
        if name.endswith((".jsonl", ".json")):
            rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
            keys = dict.fromkeys(k for r in rows for k in r)  # every key of any line (e.g. a `kind` on some rows)
            return pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows])
        if name.endswith(".csv"):
            opts = pacsv.ConvertOptions(strings_can_be_null=False)
            return pacsv.read_csv(io.BytesIO(data), convert_options=opts)
    except Exception as exc:
        raise ManifestError(f"cannot parse manifest {uri}: {type(exc).__name__}: {exc}") from exc
    raise ManifestError(f"{uri}: unknown manifest extension; expected .csv, .jsonl/.json or .parquet")


def detect_format(columns: list[str]) -> str:
    """``webvid``, ``pexels`` or ``generic`` from column names; ManifestError otherwise."""
    cols = set(columns)
    if {"videoid", "contentUrl"} <= cols:
        if "name" not in cols:
            raise ManifestError("WebVid manifest has no caption column 'name'")
        return "webvid"
    if {"id", "url"} <= cols:
        if "title" not in cols:
            raise ManifestError("Pexels-style manifest has no caption column 'title'")
        return "pexels"
    if "path" in cols:
        if "caption" not in cols:
            raise ManifestError("generic manifest has a 'path' column but no 'caption' column")
        return "generic"
    raise ManifestError(
        f"unknown manifest columns {sorted(cols)}; expected WebVid (videoid, contentUrl, name), "
        "Pexels (id, url, title) or generic (path, caption)"
    )


def _int(v: Any) -> int:
    try:
        return int(v) if v is not None and v != "" else 0
    except (TypeError, ValueError):
        return 0


def _str(v: Any) -> str:
    return "" if v is None else str(v)


def read_manifest(uri: str, s3_endpoint: str | None = None) -> list[ManifestRecord]:
    """All records of one manifest, with the format auto-detected from its columns."""
    rows = _read_table(str(uri), s3_endpoint).to_pylist()
    if not rows:
        return []
    fmt = detect_format(list(rows[0]))
    out: list[ManifestRecord] = []
    for i, r in enumerate(rows):
        if fmt == "webvid":
            uri_, cap, vid, src, mcap = r["contentUrl"], r["name"], r["videoid"], "webvid", ""
        elif fmt == "pexels":
            uri_, cap, vid, src, mcap = r["url"], r["title"], r["id"], "pexels", ""
        else:
            uri_, cap = r["path"], r["caption"]
            vid = r.get("clip_id") or r.get("id") or Path(str(uri_)).stem
            src, mcap = r.get("source"), r.get("motion_caption") or ""
        if cap is None:
            raise ManifestError(f"{uri}: row {i} has no caption")
        try:
            kind = record_kind(str(uri_), r.get("kind") if fmt == "generic" else None)
        except ValueError as exc:
            raise ManifestError(f"{uri}: row {i}: {exc}") from exc
        if fmt == "generic":
            src = src or ("image" if kind == "image" else "generic")
        out.append(ManifestRecord(
            uri=str(uri_), caption=str(cap), motion_caption=str(mcap), source=str(src),
            video_id=str(vid), width=_int(r.get("width")), height=_int(r.get("height")),
            split=_str(r.get("split")) if fmt == "generic" else "",
            motion=_str(r.get("motion")) if fmt == "generic" else "",
            kind=kind,
        ))
    return out


def read_manifests(uris: list[str], s3_endpoint: str | None = None) -> list[ManifestRecord]:
    """Concatenate several manifests (all are read and checked before returning)."""
    if not uris:
        raise ManifestError("no input manifests given")
    records: list[ManifestRecord] = []
    for u in uris:
        records += read_manifest(u, s3_endpoint)
    return records
