"""Output storage for preprocessed data: a local folder or ``s3://bucket/prefix``, through pyarrow.fs.

:func:`resolve` turns an output URI into ``(pyarrow FileSystem, base path)``; the helpers below
write, list and read files under it. Writes are atomic for readers in both cases:

- **local**: the data goes to a hidden temporary name in the same folder, then ``rename`` (atomic
  on POSIX), so a crash leaves at most a ``.*.tmp`` file that every listing ignores;
- **S3**: the final key is written directly. A PUT (and a multipart upload, which is what
  pyarrow's S3 output stream uses for large objects) makes the object visible only when it
  completes, so there is no partial object to hide and no copy is needed. A crash mid-upload leaves
  an incomplete multipart upload (invisible; expire them with a bucket lifecycle rule).

S3 credentials come from the usual AWS chain (``AWS_ACCESS_KEY_ID`` etc., instance profiles);
``s3_endpoint`` (e.g. ``http://127.0.0.1:9000`` for MinIO or moto) sets ``endpoint_override`` and
the scheme (``http`` when given, so loopback servers work without TLS).
"""

from __future__ import annotations

import os
import uuid
from functools import lru_cache
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


@lru_cache(maxsize=8)
def _s3(endpoint: str | None, region: str) -> pafs.S3FileSystem:
    kw: dict = {"region": region}
    if endpoint:
        parsed = urlparse(endpoint)
        kw["endpoint_override"] = parsed.netloc or parsed.path
        kw["scheme"] = parsed.scheme or "https"
    return pafs.S3FileSystem(**kw)


def resolve(uri: str, s3_endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, base path)`` of an output location (local path, ``file://`` or ``s3://``)."""
    uri = str(uri)
    if is_s3(uri):
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise ValueError(f"{uri}: an S3 output needs a bucket (s3://bucket/prefix)")
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
        return _s3(s3_endpoint or None, region), f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"{uri}: unsupported output scheme; expected a path, file:// or s3://")
    return pafs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def makedirs(fs: pafs.FileSystem, path: str) -> None:
    """Create a folder (local only: S3 has no folders)."""
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(path, recursive=True)


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.File


def _tmp_name(path: str) -> str:
    head, _, name = path.rpartition("/")
    return f"{head}/.{name}.{uuid.uuid4().hex[:8]}.tmp"


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write ``data`` at ``path`` atomically (see the module docstring)."""
    if isinstance(fs, pafs.LocalFileSystem):
        makedirs(fs, path.rpartition("/")[0])
        tmp = _tmp_name(path)
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)  # rename
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


def write_parquet(fs: pafs.FileSystem, path: str, table: pa.Table, **kwargs: object) -> None:
    """``pq.write_table`` at ``path`` atomically (temp + rename locally, one upload on S3)."""
    if isinstance(fs, pafs.LocalFileSystem):
        makedirs(fs, path.rpartition("/")[0])
        tmp = _tmp_name(path)
        pq.write_table(table, tmp, filesystem=fs, **kwargs)
        fs.move(tmp, path)
    else:
        pq.write_table(table, path, filesystem=fs, **kwargs)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def list_files(fs: pafs.FileSystem, folder: str, prefix: str = "", suffix: str = "") -> list[str]:
    """Sorted paths of the complete files directly in ``folder`` named ``prefix*suffix``.

    Hidden names (``.*``, i.e. local temporaries) are skipped; a missing folder gives ``[]``.
    """
    try:
        infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    except (FileNotFoundError, OSError):
        return []
    out = []
    for info in infos:
        name = info.base_name
        if info.type == pafs.FileType.File and not name.startswith(".") and name.startswith(prefix) \
                and name.endswith(suffix):
            out.append(info.path)
    return sorted(out)


def read_parquet(fs: pafs.FileSystem, path: str, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(path, filesystem=fs, columns=columns)


def parquet_metadata(fs: pafs.FileSystem, path: str) -> pq.FileMetaData:
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).metadata
