"""Read clip manifests (WebVid CSV, Pexels-style CSV, generic Parquet/JSONL) from disk or ``s3://``.

Every reader returns a list of :class:`ManifestRecord` dicts with the same keys
(``uri, caption, motion_caption, source, video_id, width, height, split, motion, kind``). The format is detected
from the columns:

- WebVid: ``videoid, contentUrl, name`` (caption = ``name``),
- Pexels-style: ``id, url, title`` (caption = ``title``; ``width``/``height`` kept when present),
- generic: ``path, caption[, motion_caption, clip_id, source, width, height, split, motion]``;
  ``split`` and ``motion`` are free-form metadata carried into the output columns of the same
  name (empty strings when absent, and for the WebVid/Pexels formats). ``motion_caption`` (a short
  description of the motion, which the job's ``t5_caption: motion_caption`` option gives to T5) is
  likewise the empty string when absent or null, and always for WebVid/Pexels.

``kind`` is ``video`` or ``image`` (:func:`fdreamer.data.images.record_kind`): a generic manifest's
``kind`` column when present and non-empty (``video`` | ``image``, anything else is a ManifestError),
else ``image`` when the path ends with .png/.jpg/.jpeg/.webp/.bmp, else ``video`` — so a manifest of
``path, caption`` rows pointing at PNG/JPEG files is an image manifest as it is. Image records without a
``source`` column get the source ``image``.

Anything else (no caption column, unreadable file, unknown URI scheme) raises :class:`ManifestError`
before any video is touched, and so does a bad record: the job fails before Ray starts, with the
manifest, the record (``line N, row I`` for JSONL and CSV, ``row I`` for Parquet) and the field in
the message. Bad records are: invalid JSON, a JSONL line that is not an object, a field nested more
than :data:`MAX_JSON_DEPTH` arrays/objects deep (checked by a flat scan before parsing, so a deep line
never reaches the recursive JSON parser), a list/object where a field the format reads must be a
string or number, no caption, an unknown ``kind``. Columns a format does not read are ignored.
"""

from __future__ import annotations

import csv
import functools
import io
import json
from pathlib import Path
from typing import Any, TypedDict
from urllib.parse import urlparse

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


@functools.lru_cache(maxsize=8)
def s3_client(endpoint: str | None) -> Any:
    """One boto3 client per endpoint and process (thread-safe; its connection pool is reused for every
    object a worker reads, instead of a new client and connection per video)."""
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
        client = s3_client(s3_endpoint)
        try:
            return client.get_object(Bucket=parsed.netloc, Key=parsed.path.lstrip("/"))["Body"].read()
        except client.exceptions.NoSuchKey as exc:
            raise FileNotFoundError(f"{uri}: no such S3 object") from exc
    path = Path(parsed.path if scheme == "file" else str(uri))
    return path.read_bytes()


MAX_JSON_DEPTH = 32  # arrays/objects of one JSONL record, the record itself counted


def _json_too_deep(line: str, limit: int = MAX_JSON_DEPTH) -> str | None:
    """The top-level key whose value nests arrays/objects deeper than ``limit`` (``""`` for the record
    itself, e.g. a line of nested arrays), or None when the line stays within it.

    A flat scan (no recursion) that runs before ``json.loads``, whose parser recurses once per level
    and would hit Python's recursion limit on a deep enough line.
    """
    if line.count("[") + line.count("{") <= limit:  # the depth cannot exceed the number of openers
        return None
    depth, key, text, in_str, esc = 0, "", [], False, False
    last_str = ""
    for ch in line:
        if in_str:
            if esc or ch not in '\\"':
                esc = False
                if depth == 1:  # strings of the record itself (its keys); an escape keeps the next character
                    text.append(ch)
            elif ch == "\\":
                esc = True
            else:
                in_str = False
                last_str = "".join(text)
            continue
        if ch == '"':
            in_str, text = True, []
        elif ch == ":" and depth == 1:
            key = last_str
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return key
        elif ch in "]}":
            depth -= 1
    return None


def _parse_jsonl(uri: str, data: bytes) -> tuple[list[dict], list[str], list[str]]:
    """Records of a JSON-lines manifest, the union of their keys, and each record's location."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"cannot parse manifest {uri}: not UTF-8 text: {exc}") from exc
    rows: list[dict] = []
    where: list[str] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        at = f"{uri}: line {n}"
        deep = _json_too_deep(line)
        if deep is not None:
            what = f"field {deep!r}" if deep else "the record"
            raise ManifestError(f"{at}: {what} nests arrays/objects more than {MAX_JSON_DEPTH} levels deep; "
                                "manifest fields are flat values (strings, numbers)")
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise ManifestError(f"{at}: invalid JSON: {exc}") from exc
        if not isinstance(rec, dict):
            raise ManifestError(f"{at}: expected one JSON object per line, got {type(rec).__name__}")
        rows.append(rec)
        where.append(f"line {n}, row {len(rows) - 1}")
    columns = list(dict.fromkeys(k for r in rows for k in r))  # every key of any line (e.g. a `kind` on some rows)
    return [{k: r.get(k) for k in columns} for r in rows], columns, where


def _read_rows(uri: str, s3_endpoint: str | None) -> tuple[list[dict], list[str], list[str]]:
    """(rows, column names, location of each row for error messages) of one manifest."""
    try:
        data = read_bytes(uri, s3_endpoint)
    except ManifestError:
        raise
    except Exception as exc:  # missing file, permissions, S3 errors: all fatal for a manifest
        raise ManifestError(f"cannot read manifest {uri}: {type(exc).__name__}: {exc}") from exc
    name = urlparse(uri).path.lower()
    if name.endswith((".jsonl", ".json")):
        return _parse_jsonl(uri, data)
    try:
        if name.endswith(".parquet"):
            table = pq.read_table(io.BytesIO(data))
            where = [f"row {i}" for i in range(table.num_rows)]
        elif name.endswith(".csv"):
            opts = pacsv.ConvertOptions(strings_can_be_null=False)
            table = pacsv.read_csv(io.BytesIO(data), convert_options=opts)
            where = [f"line {i + 2}, row {i}" for i in range(table.num_rows)]  # line 1 is the header
        else:
            raise ManifestError(f"{uri}: unknown manifest extension; expected .csv, .jsonl/.json or .parquet")
        return table.to_pylist(), table.column_names, where
    except ManifestError:
        raise
    except Exception as exc:
        raise ManifestError(f"cannot parse manifest {uri}: {type(exc).__name__}: {exc}") from exc


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


# The columns each format reads (any other column is ignored).
RECORD_FIELDS: dict[str, tuple[str, ...]] = {
    "webvid": ("contentUrl", "name", "videoid", "width", "height"),
    "pexels": ("url", "title", "id", "width", "height"),
    "generic": ("path", "caption", "motion_caption", "clip_id", "id", "source", "width", "height", "split",
                "motion", "kind"),
}


def _int(v: Any) -> int:
    try:
        return int(v) if v is not None and v != "" else 0
    except (TypeError, ValueError):
        return 0


def _str(v: Any) -> str:
    return "" if v is None else str(v)


def _scalar(r: dict, key: str, at: str) -> Any:
    """``r[key]`` (None when absent), or a ManifestError naming the field when it is a list/object."""
    v = r.get(key)
    if isinstance(v, (dict, list, tuple)):
        got = "an object" if isinstance(v, dict) else "a list"
        raise ManifestError(f"{at}: field {key!r} must be a string or number, got {got}")
    return v


def read_manifest(uri: str, s3_endpoint: str | None = None) -> list[ManifestRecord]:
    """All records of one manifest, with the format auto-detected from its columns.

    Errors name the manifest, the record (``line N, row I`` for JSONL/CSV, ``row I`` for Parquet)
    and the field.
    """
    rows, columns, where = _read_rows(str(uri), s3_endpoint)
    if not rows:
        return []
    fmt = detect_format(columns)
    out: list[ManifestRecord] = []
    for i, row in enumerate(rows):
        at = f"{uri}: {where[i]}"
        r = {k: _scalar(row, k, at) for k in RECORD_FIELDS[fmt] if k in row}
        if fmt == "webvid":
            uri_, cap, vid, src, mcap = r["contentUrl"], r["name"], r["videoid"], "webvid", ""
        elif fmt == "pexels":
            uri_, cap, vid, src, mcap = r["url"], r["title"], r["id"], "pexels", ""
        else:
            uri_, cap = r["path"], r["caption"]
            vid = r.get("clip_id") or r.get("id") or Path(str(uri_)).stem
            src, mcap = r.get("source"), r.get("motion_caption") or ""
        if cap is None:
            raise ManifestError(f"{at}: no caption")
        try:
            kind = record_kind(str(uri_), r.get("kind") if fmt == "generic" else None)
        except ValueError as exc:
            raise ManifestError(f"{at}: {exc}") from exc
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


def check_header(uri: str, s3_endpoint: str | None = None) -> str:
    """The format of one manifest from its header only (CSV header line, first JSONL record, Parquet
    schema): a cheap check before any distributed work; ManifestError when it cannot be a manifest.
    The records themselves are checked when the manifest is read (:func:`read_manifest`)."""
    import pyarrow.fs as pafs

    name = urlparse(str(uri)).path.lower()
    if not name.endswith((".jsonl", ".json", ".parquet", ".csv")):
        raise ManifestError(f"{uri}: unknown manifest extension; expected .csv, .jsonl/.json or .parquet")
    try:
        if str(uri).startswith("s3://"):
            from fdreamer.data.storage import resolve

            fs, path = resolve(str(uri), s3_endpoint)
        else:
            fs, path = pafs.LocalFileSystem(), str(Path(urlparse(str(uri)).path if str(uri).startswith("file://")
                                                         else str(uri)).resolve())
        if name.endswith(".parquet"):
            with fs.open_input_file(path) as f:
                columns = pq.read_schema(f).names
        else:
            with fs.open_input_stream(path) as f:
                head = f.read(1 << 16).decode("utf-8", errors="replace")
            lines = [ln for ln in head.splitlines() if ln.strip()]
            if not lines:
                return "empty"
            if name.endswith(".csv"):
                columns = next(csv.reader([lines[0]]))
            else:
                try:
                    first = json.loads(lines[0])
                except ValueError:
                    return "jsonl"  # the full read names the line and the error
                columns = list(first) if isinstance(first, dict) else []
    except ManifestError:
        raise
    except Exception as exc:  # missing file, permissions, S3 errors
        raise ManifestError(f"cannot read manifest {uri}: {type(exc).__name__}: {exc}") from exc
    return detect_format(columns) if columns else "jsonl"


def read_manifests(uris: list[str], s3_endpoint: str | None = None) -> list[ManifestRecord]:
    """Concatenate several manifests (all are read and checked before returning)."""
    if not uris:
        raise ManifestError("no input manifests given")
    records: list[ManifestRecord] = []
    for u in uris:
        records += read_manifest(u, s3_endpoint)
    return records
