"""Read video2dataset's output layouts as manifests: WebDataset tar shards, and parquet + files.

video2dataset (the usual way WebVid and Pexels are downloaded) writes, per shard ``NNNNN``:

- ``output_format=webdataset``: ``NNNNN.tar`` holding ``{key}.mp4``, ``{key}.txt`` (the caption) and
  ``{key}.json`` (``url``, ``key``, ``status``, ``caption`` and the ``save_additional_columns`` of the input,
  e.g. WebVid's ``videoid, page_dir, duration``), plus ``NNNNN.parquet`` (the same metadata, one row per
  input row, failed downloads included) and ``NNNNN_stats.json``;
- ``output_format=files``: a folder ``NNNNN/`` with the same ``{key}.*`` files, and ``NNNNN.parquet``.

A tar shard is indexed by walking its headers (the data of each member is skipped, not read); a video
member becomes a record whose uri names the shard, the member and its byte range
(:func:`fdreamer.data.sources.member_uri`), so pass 1 and pass 2 each read just that video with one
range read. The json and txt members (a few hundred bytes) are read while indexing.

Identity: a record is ``source = webvid`` with ``video_id = videoid`` when the metadata has WebVid's
``videoid`` column, ``pexels`` with ``id`` when it has an ``id`` column (Pexels CSVs), the metadata's own
``source`` when it has one, and else ``source = video2dataset`` with the sample key. So the same videos
give the same clip ids from a WebVid CSV and from its video2dataset shards.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any, BinaryIO

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fdreamer.data import storage
from fdreamer.data.images import record_kind
from fdreamer.data.manifests import ManifestError, ManifestRecord
from fdreamer.data.sources import is_http, member_uri

VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "mov", "avi", "m4v")
PARQUET_COLUMNS = {"key", "status"}  # with url and/or caption: a video2dataset shard's parquet
SUCCESS = "success"


def _open(uri: str, s3_endpoint: str | None) -> BinaryIO:
    if is_http(uri):
        raise ManifestError(f"{uri}: tar shards over http(s) are not indexed (that would download the shard once "
                            "per read); copy them to a local folder or s3:// first")
    fs, path = storage.resolve(uri, s3_endpoint)
    return fs.open_input_file(path)


def _sample_key(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the member path up to the first '.' of its base name; the rest the field."""
    path = PurePosixPath(name)
    stem, _, field = path.name.partition(".")
    return str(path.with_name(stem)), field.lower()


def _identity(meta: dict[str, Any], key: str) -> tuple[str, str]:
    """(source, video_id) of a sample's metadata (module docstring)."""
    if meta.get("source"):
        return str(meta["source"]), str(meta.get("videoid") or meta.get("id") or key)
    if meta.get("videoid") not in (None, ""):
        return "webvid", str(meta["videoid"])
    if meta.get("id") not in (None, ""):
        return "pexels", str(meta["id"])
    return "video2dataset", key


def _int(v: Any) -> int:
    try:
        return int(v) if v not in (None, "") else 0
    except (TypeError, ValueError):
        return 0


def _record(uri: str, meta: dict[str, Any], caption: str | None, key: str, at: str) -> ManifestRecord:
    source, video_id = _identity(meta, key)
    text = meta.get("caption") if meta.get("caption") is not None else caption
    if text is None:
        raise ManifestError(f"{at}: sample {key!r} has no caption (no 'caption' in its json, no .txt member)")
    return ManifestRecord(uri=uri, caption=str(text), motion_caption="", source=source, video_id=video_id,
                          width=_int(meta.get("width")), height=_int(meta.get("height")),
                          split=str(meta.get("split") or ""), motion="", kind=record_kind(uri, "video"))


def _walk(f: BinaryIO, uri: str) -> Iterator[tuple[tarfile.TarInfo, BinaryIO]]:
    try:
        with tarfile.open(fileobj=f, mode="r:") as tar:
            for info in tar:
                if info.isfile():
                    yield info, tar
    except tarfile.TarError as exc:
        raise ManifestError(f"{uri}: not a readable tar shard ({exc})") from exc


def read_tar(uri: str, s3_endpoint: str | None = None) -> list[ManifestRecord]:
    """The video samples of one WebDataset tar shard (local or ``s3://``), in member order."""
    samples: dict[str, dict[str, Any]] = {}
    with _open(uri, s3_endpoint) as f:
        for info, tar in _walk(f, uri):
            key, field = _sample_key(info.name)
            sample = samples.setdefault(key, {})
            if field in VIDEO_EXTENSIONS and "video" not in sample:
                sample["video"] = member_uri(uri, info.name, info.offset_data, info.size)
            elif field in ("json", "txt"):
                data = tar.extractfile(info).read()  # type: ignore[union-attr]
                sample[field] = data.decode("utf-8", errors="replace")
    out = []
    for key, sample in samples.items():
        if "video" not in sample:
            continue  # a sample without a video (video2dataset writes none for failed downloads)
        at = f"{uri}: sample {key}"
        try:
            meta = json.loads(sample["json"]) if "json" in sample else {}
        except ValueError as exc:
            raise ManifestError(f"{at}: invalid {key}.json: {exc}") from exc
        if not isinstance(meta, dict):
            raise ManifestError(f"{at}: {key}.json is not a JSON object")
        out.append(_record(sample["video"], meta, sample.get("txt"), str(meta.get("key") or key), at))
    return out


def is_v2d_parquet(columns: list[str]) -> bool:
    """True for the columns of a video2dataset shard's parquet (``key``, ``status`` and ``url`` or ``caption``)."""
    cols = set(columns)
    return PARQUET_COLUMNS <= cols and bool({"url", "caption"} & cols)


def read_parquet(uri: str, s3_endpoint: str | None = None, extension: str = "mp4") -> list[ManifestRecord]:
    """The samples of a video2dataset shard's parquet: ``NNNNN/{key}.mp4`` beside it (``files`` layout), or
    the tar shard ``NNNNN.tar`` beside it (``webdataset`` layout: read through :func:`read_tar`).

    Rows whose ``status`` is not ``success`` (failed downloads) stay records pointing at the file
    video2dataset did not write: they leave the job as quarantine rows (``missing``), not silently.
    """
    fs, path = storage.resolve(uri, s3_endpoint)
    stem = path[: -len(".parquet")]
    folder_uri = uri[: -len(".parquet")]
    if storage.exists(fs, f"{stem}.tar") and fs.get_file_info(stem).type != pafs.FileType.Directory:
        return read_tar(f"{folder_uri}.tar", s3_endpoint)
    try:
        with fs.open_input_file(path) as f:
            rows = pq.read_table(f).to_pylist()
    except Exception as exc:
        raise ManifestError(f"cannot read {uri}: {type(exc).__name__}: {exc}") from exc
    out = []
    for i, row in enumerate(rows):
        key = str(row.get("key") or "")
        if not key:
            raise ManifestError(f"{uri}: row {i}: no key")
        out.append(_record(f"{folder_uri}/{key}.{extension}", row, None, key, f"{uri}: row {i}"))
    return out


def shards_in(uri: str, s3_endpoint: str | None = None) -> list[str]:
    """The shard files of a video2dataset output folder: its ``*.tar``, else its ``*.parquet`` (sorted)."""
    fs, base = storage.resolve(uri.rstrip("/"), s3_endpoint)
    prefix = uri.rstrip("/")
    for suffix in (".tar", ".parquet"):
        names = storage.list_files(fs, base, suffix=suffix)
        if names:
            return [f"{prefix}/{n.rsplit('/', 1)[-1]}" for n in sorted(names)]
    raise ManifestError(f"{uri}: a folder with no *.tar or *.parquet shards (is it a video2dataset output?)")
