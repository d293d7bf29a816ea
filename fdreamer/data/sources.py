"""Where a record's video bytes come from: a local path, ``s3://``, ``http(s)://``, or a member of a tar shard.

A manifest record's ``uri`` is one of

- a local path or ``file://`` URI: decoded in place (no copy);
- ``s3://bucket/key``: read whole (one GET, boto3);
- ``http://`` / ``https://``: fetched by :func:`fdreamer.data.fetch.fetch` (timeouts, retries on 5xx and
  resets, a size cap, a per-host limit; a failure is a :class:`fdreamer.data.fetch.FetchError` whose
  ``reason`` becomes the quarantine reason);
- a **tar member** ``<shard uri>#<member>@<offset>+<size>`` (a video2dataset / WebDataset shard, local or
  ``s3://`` or ``http(s)://``, :mod:`fdreamer.data.v2d`): the member's bytes by one range read at the
  offset found when the shard was indexed, so a worker never scans or downloads a whole shard for one
  video.

:func:`is_remote` tells the decode stages which sources are worth fetching ahead of the decoder
(:func:`fdreamer.data.fetch.prefetch`).
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlparse

from fdreamer.data.fetch import FetchConfig, fetch
from fdreamer.data.manifests import ManifestError, read_bytes, s3_client

_MEMBER = re.compile(r"^(?P<shard>.+)#(?P<member>[^#@]+)@(?P<offset>\d+)\+(?P<size>\d+)$")


class SourceError(ManifestError):
    """A record's uri names no source this job can read (quarantined as ``unsupported_uri``)."""

    reason = "unsupported_uri"


def member_uri(shard: str, member: str, offset: int, size: int) -> str:
    """The uri of tar member ``member`` whose data starts at byte ``offset`` of ``shard`` (``size`` bytes)."""
    if "#" in member or "@" in member:
        raise SourceError(f"{shard}: tar member name {member!r} has '#' or '@', which member uris reserve")
    return f"{shard}#{member}@{int(offset)}+{int(size)}"


def parse_member(uri: str) -> tuple[str, str, int, int] | None:
    """``(shard, member, offset, size)`` of a tar-member uri, or None for any other uri."""
    m = _MEMBER.match(uri)
    return (m["shard"], m["member"], int(m["offset"]), int(m["size"])) if m else None


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def is_remote(uri: str) -> bool:
    """True when reading ``uri`` means a network transfer (S3, HTTP, or a member of a remote shard)."""
    member = parse_member(uri)
    target = member[0] if member else uri
    return target.startswith("s3://") or is_http(target)


def _read_range(shard: str, offset: int, size: int, s3_endpoint: str | None, fetch_cfg: FetchConfig) -> bytes:
    """``size`` bytes of ``shard`` from ``offset`` (one local read, one S3 ranged GET or one HTTP Range request)."""
    if is_http(shard):
        return fetch(shard, fetch_cfg, byte_range=(offset, size))
    if shard.startswith("s3://"):
        parsed = urlparse(shard)
        client = s3_client(s3_endpoint)
        try:
            body = client.get_object(Bucket=parsed.netloc, Key=parsed.path.lstrip("/"),
                                     Range=f"bytes={offset}-{offset + size - 1}")["Body"].read()
        except client.exceptions.NoSuchKey as exc:
            raise FileNotFoundError(f"{shard}: no such S3 object") from exc
    else:
        with open(shard.removeprefix("file://"), "rb") as f:
            f.seek(offset)
            body = f.read(size)
    if len(body) != size:
        raise OSError(f"{shard}: tar member at byte {offset} has {len(body)} of its {size} bytes (truncated shard)")
    return body


def open_source(uri: str, s3_endpoint: str | None = None, fetch_cfg: FetchConfig | None = None) -> str | bytes:
    """What the decoders read for ``uri``: a local path as is, else the bytes (module docstring)."""
    fetch_cfg = fetch_cfg or FetchConfig()
    member = parse_member(uri)
    if member is not None:
        shard, _, offset, size = member
        return _read_range(shard, offset, size, s3_endpoint, fetch_cfg)
    if is_http(uri):
        return fetch(uri, fetch_cfg)
    if uri.startswith("s3://"):
        return read_bytes(uri, s3_endpoint)
    scheme = urlparse(uri).scheme
    if len(scheme) > 1 and scheme != "file":
        raise SourceError(f"{uri}: unsupported URI scheme {scheme!r}; expected a path, file://, s3://, "
                          "http(s):// or a tar member (<shard>#<member>@<offset>+<size>)")
    return str(Path(uri.removeprefix("file://")))
