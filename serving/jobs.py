"""Job records and videos in a store that outlives replicas: a local directory or ``s3://bucket/prefix``.

Layout under the store root::

    jobs/<id>.json      the job record (status, progress, seed, timings, error, the request's parameters)
    videos/<id>.mp4     the output video
    cancel/<id>         present when a cancel was requested (the model replicas' step callback polls it)

Both back ends go through :mod:`pyarrow.fs` (``LocalFileSystem`` / ``S3FileSystem``); S3 takes its
endpoint from the ``endpoint`` argument, else ``FDREAMER_S3_ENDPOINT`` / ``AWS_ENDPOINT_URL`` (MinIO,
moto), credentials and region from the usual ``AWS_*`` variables. A record is replaced whole: local
writes go to a temporary name and are renamed, S3 puts are atomic, so a reader never sees half a record.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
_ID = re.compile(r"^[0-9a-f]{32}$")


def new_job_id() -> str:
    return uuid.uuid4().hex


def valid_job_id(job_id: str) -> bool:
    """Ids are 32 lowercase hex digits; anything else (``..``, slashes) never reaches the store."""
    return bool(_ID.match(job_id or ""))


def _s3_filesystem(endpoint: str | None) -> pafs.S3FileSystem:
    endpoint = endpoint or os.environ.get("FDREAMER_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict[str, Any] = {}
    if os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION"):
        kwargs["region"] = os.environ.get("AWS_REGION") or os.environ["AWS_DEFAULT_REGION"]
    if endpoint:
        u = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
        kwargs.update(endpoint_override=u.netloc, scheme=u.scheme or "http")
    return pafs.S3FileSystem(**kwargs)


class JobStore:
    """Job records + videos under ``uri`` (a local path or ``s3://bucket/prefix``)."""

    def __init__(self, uri: str | os.PathLike, endpoint: str | None = None) -> None:
        uri = str(uri)
        self.uri = uri
        if uri.startswith("s3://"):
            self.fs: pafs.FileSystem = _s3_filesystem(endpoint)
            self.root = uri[len("s3://"):].rstrip("/")
            self.local = False
        else:
            self.fs = pafs.LocalFileSystem()
            self.root = str(Path(uri).expanduser().resolve())
            self.local = True
        for sub in ("jobs", "videos", "cancel"):
            self.fs.create_dir(self._path(sub), recursive=True)

    # ------------------------------------------------------------------ paths and raw io

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _write(self, path: str, data: bytes) -> None:
        if self.local:
            tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            self.fs.move(tmp, path)  # rename: readers see the old or the new file, never half
        else:
            with self.fs.open_output_stream(path) as f:
                f.write(data)

    def _read(self, path: str) -> bytes | None:
        try:
            with self.fs.open_input_stream(path) as f:
                return f.read()
        except (FileNotFoundError, OSError) as err:
            if isinstance(err, FileNotFoundError) or "not found" in str(err).lower() or "No such" in str(err):
                return None
            raise

    def _exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def ping(self) -> None:
        """Raise when the store cannot be reached (health checks)."""
        self.fs.get_file_info(self._path("jobs"))

    # ------------------------------------------------------------------ records

    def put(self, record: dict[str, Any]) -> dict[str, Any]:
        record = {**record, "updated_at": time.time()}
        self._write(self._path("jobs", f"{record['id']}.json"), json.dumps(record, sort_keys=True).encode())
        return record

    def get(self, job_id: str) -> dict[str, Any] | None:
        if not valid_job_id(job_id):
            return None
        data = self._read(self._path("jobs", f"{job_id}.json"))
        return None if data is None else json.loads(data)

    def update(self, job_id: str, **fields: Any) -> dict[str, Any] | None:
        """Read, change ``fields``, write back (the last writer wins; see the module docstring)."""
        record = self.get(job_id)
        if record is None:
            return None
        record.update(fields)
        return self.put(record)

    def recent(self, limit: int = 20) -> list[dict[str, Any]]:
        """The ``limit`` most recently created jobs, newest first."""
        infos = [i for i in self.fs.get_file_info(pafs.FileSelector(self._path("jobs"), allow_not_found=True))
                 if i.type == pafs.FileType.File and i.path.endswith(".json")]
        infos.sort(key=lambda i: i.mtime_ns or 0, reverse=True)
        out = []
        for info in infos[: max(4 * limit, limit + 16)]:  # mtime is the last update: read some more, sort by creation
            data = self._read(info.path)
            if data is not None:
                try:
                    out.append(json.loads(data))
                except ValueError:
                    continue
        out.sort(key=lambda r: r.get("created_at", 0.0), reverse=True)
        return out[:limit]

    # ------------------------------------------------------------------ videos and cancel markers

    def put_video(self, job_id: str, data: bytes) -> str:
        path = self._path("videos", f"{job_id}.mp4")
        self._write(path, data)
        return path

    def get_video(self, job_id: str) -> bytes | None:
        return self._read(self._path("videos", f"{job_id}.mp4")) if valid_job_id(job_id) else None

    def request_cancel(self, job_id: str) -> None:
        self._write(self._path("cancel", job_id), b"1")

    def cancel_requested(self, job_id: str) -> bool:
        return self._exists(self._path("cancel", job_id))


__all__ = ["STATUSES", "TERMINAL", "JobStore", "new_job_id", "valid_job_id"]
