"""The preprocessing job's inputs, in every form users hold WebVid and Pexels: one entry point over the readers.

An input is

- a manifest (:mod:`fdreamer.data.manifests`): a WebVid or Pexels CSV (local paths, ``s3://`` or
  ``https://`` links), a generic JSONL / Parquet manifest;
- a video2dataset shard (:mod:`fdreamer.data.v2d`): a WebDataset ``.tar``, or a shard's ``.parquet``
  (the ``files`` layout, or the ``webdataset`` layout's sidecar);
- a folder (local, or an ``s3://`` prefix ending in ``/``) of video2dataset shards: its ``*.tar``, else
  its ``*.parquet``, each one input.

:func:`expand_inputs` turns folders into their shards (a listing, on the driver: no file is read);
:func:`check_input` reads only a header or schema (fails fast before any Ray work); :func:`read_input` reads
one input's records (run by one task per input in the job).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import pyarrow.parquet as pq

from fdreamer.data import manifests, storage, v2d
from fdreamer.data.manifests import ManifestError, ManifestRecord


def _is_folder(uri: str) -> bool:
    if uri.startswith("s3://"):
        return uri.endswith("/")
    return "://" not in uri.removeprefix("file://") and Path(uri.removeprefix("file://")).is_dir()


def _suffix(uri: str) -> str:
    return urlparse(uri).path.lower().rsplit(".", 1)[-1] if "." in urlparse(uri).path else ""


def expand_inputs(uris: list[str], s3_endpoint: str | None = None) -> list[str]:
    """``uris`` with each folder replaced by its video2dataset shards (in order)."""
    if not uris:
        raise ManifestError("no input manifests given")
    out: list[str] = []
    for uri in map(str, uris):
        out += v2d.shards_in(uri, s3_endpoint) if _is_folder(uri) else [uri]
    return out


def _parquet_columns(uri: str, s3_endpoint: str | None) -> list[str]:
    fs, path = storage.resolve(uri, s3_endpoint)
    with fs.open_input_file(path) as f:
        return pq.read_schema(f).names


def check_input(uri: str, s3_endpoint: str | None = None) -> str:
    """The input's format from its header only (``webdataset``, ``video2dataset``, or a manifest format);
    ManifestError when it cannot be read as any. A folder is checked through its first shard."""
    uri = str(uri)
    if _is_folder(uri):
        return check_input(v2d.shards_in(uri, s3_endpoint)[0], s3_endpoint)
    try:
        if _suffix(uri) == "tar":
            if uri.startswith(("http://", "https://")):
                raise ManifestError(f"{uri}: tar shards over http(s) are not indexed; copy them to a local folder "
                                    "or s3:// first")
            fs, path = storage.resolve(uri, s3_endpoint)
            with fs.open_input_file(path) as f:
                head = f.read(512)
            if len(head) < 512 or head[257:262] != b"ustar":
                raise ManifestError(f"{uri}: not a tar shard (no ustar header)")
            return "webdataset"
        if _suffix(uri) == "parquet" and v2d.is_v2d_parquet(_parquet_columns(uri, s3_endpoint)):
            return "video2dataset"
    except ManifestError:
        raise
    except Exception as exc:  # missing file, permissions, S3 errors
        raise ManifestError(f"cannot read input {uri}: {type(exc).__name__}: {exc}") from exc
    return manifests.check_header(uri, s3_endpoint)


def read_input(uri: str, s3_endpoint: str | None = None) -> list[ManifestRecord]:
    """Every record of one input (module docstring); errors name the input and the record."""
    uri = str(uri)
    if _suffix(uri) == "tar":
        return v2d.read_tar(uri, s3_endpoint)
    if _suffix(uri) == "parquet":
        try:
            columns = _parquet_columns(uri, s3_endpoint)
        except Exception as exc:
            raise ManifestError(f"cannot read manifest {uri}: {type(exc).__name__}: {exc}") from exc
        if v2d.is_v2d_parquet(columns):
            return v2d.read_parquet(uri, s3_endpoint)
    return manifests.read_manifest(uri, s3_endpoint)

