"""Fetch http(s) video inputs (WebVid ``contentUrl``, Pexels links) robustly, for the decode workers.

:func:`fetch` returns the body (or a byte range) or raises :class:`FetchError`, whose ``reason`` is a
quarantine reason (:mod:`fdreamer.data.quarantine`): a bad URL becomes one row, not a failed job.

Retried (``retries`` times, exponential backoff with jitter, ``Retry-After`` honoured on 429/503 up to
``max_retry_after_s``): 5xx and 429 (an overloaded or restarting server; a 429 that persists ends as
``http_4xx``), refused/reset connections and DNS failures (transient network trouble), connect and read
timeouts (a stalled peer usually answers on a fresh connection), truncated bodies (a connection dropped
mid-transfer). Not retried: 404 and other 4xx, too many redirects (``http_4xx``): asking again gives the
same answer; certificate failures: a wrong CA bundle or an intercepted connection does not heal, and
retrying only hides it; bodies over ``max_bytes``: checked on Content-Length before reading, so a huge
file costs nothing; and the ``total_timeout_s`` deadline, which bounds the *whole call* (attempts,
backoff sleeps, a trickling body), so one slow URL never holds a decode worker longer than that.

Concurrency: at most ``per_host`` requests per host *per process* (a ``BoundedSemaphore`` held for
each attempt). A cluster-wide limit is therefore ``per_host x decode tasks``; size it for the CDN.
One ``PoolManager`` per process and CA bundle is shared by all threads, so connections are reused.
"""

from __future__ import annotations

import contextlib
import email.utils
import os
import random
import re
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urljoin

import urllib3
from urllib3 import exceptions as u3e

from fdreamer.config import opt

FETCH_REASONS: tuple[str, ...] = ("http_404", "http_4xx", "http_5xx_after_retries", "timeout", "too_large",
                                  "truncated", "connection_failed", "tls")
_CHUNK = 1 << 20
T = TypeVar("T")
_LIMITS = {  # FetchConfig field: (type, lowest value, whether the lowest itself is refused)
    "connect_timeout_s": (float, 0, True), "read_timeout_s": (float, 0, True), "total_timeout_s": (float, 0, True),
    "retries": (int, 0, False), "backoff_s": (float, 0, False), "max_bytes": (int, 1, False),
    "per_host": (int, 1, False), "max_redirects": (int, 0, False), "max_retry_after_s": (float, 0, False)}


@dataclass(frozen=True)
class FetchConfig:
    """Timeouts, retries and limits of :func:`fetch` (seconds and bytes)."""

    connect_timeout_s: float = opt(10.0, "seconds to open a connection (TLS handshake included)")
    read_timeout_s: float = opt(30.0, "socket inactivity: seconds without a byte before the attempt fails")
    total_timeout_s: float = opt(300.0, "deadline of the whole fetch (attempts, backoff, body), so a trickling "
                                        "body also ends")
    retries: int = opt(3, "retries after the first attempt, on 5xx, 429, resets/refusals, read timeouts and "
                          "truncated bodies (404, other 4xx and TLS failures are final)")
    backoff_s: float = opt(0.5, "sleep before retry k: backoff_s * 2**(k-1), jittered x[0.5, 1.5), at least a "
                                "server's Retry-After")
    max_bytes: int = opt(2 << 30, "largest body accepted (Content-Length, and the bytes read): else too_large")
    per_host: int = opt(8, "concurrent requests per host in one process (a cluster-wide cap is per_host x the "
                           "decode tasks)")
    ca_bundle: str | None = opt(None, "PEM file to verify HTTPS with (null: $FDREAMER_CA_BUNDLE, else "
                                      "$SSL_CERT_FILE, else certifi/system); must exist on every node")
    max_redirects: int = opt(5, "redirects followed per fetch")
    max_retry_after_s: float = opt(60.0, "cap on a server's Retry-After")

    def __post_init__(self) -> None:
        for name, (kind, low, strict) in _LIMITS.items():
            value = getattr(self, name)
            typed = not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int)
            if not typed or not (value > low if strict else value >= low):
                what = "a number (seconds)" if kind is float else "an int"
                raise ValueError(f"FetchConfig.{name} must be {what} {'>' if strict else '>='} {low}, got {value!r}")
        if self.ca_bundle is not None and not os.path.isfile(self.ca_bundle):
            raise ValueError(f"FetchConfig.ca_bundle must be an existing PEM file, got {self.ca_bundle!r}")


class FetchError(OSError):
    """A URL could not be fetched; ``reason`` is one of :data:`FETCH_REASONS` (a quarantine reason)."""

    def __init__(self, url: str, reason: str, status: int | None = None, attempts: int = 1,
                 last_error: str = "") -> None:
        if reason not in FETCH_REASONS:
            raise ValueError(f"FetchError reason must be one of {list(FETCH_REASONS)}, got {reason!r}")
        super().__init__(f"fetch {url} failed: reason={reason} status={status} attempts={attempts}: {last_error}")
        self.url, self.reason, self.status, self.attempts, self.last_error = url, reason, status, attempts, last_error

    def __reduce__(self) -> tuple:  # OSError pickles self.args; ours differ (Ray ships errors across processes)
        return (type(self), (self.url, self.reason, self.status, self.attempts, self.last_error))


class _Failure(Exception):
    """One attempt failed: ``reason`` to report if it is the last, whether to retry, and why."""

    def __init__(self, reason: str, detail: str, status: int | None = None, retry: bool = True,
                 retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.reason, self.detail, self.status, self.retry, self.retry_after = reason, detail, status, retry, retry_after


# Keyed by pid too: a forked child must not share its parent's sockets or semaphore counts.
_lock = threading.Lock()
_pools: dict[tuple[int, str | None], urllib3.PoolManager] = {}
_slots: dict[tuple[int, str, int], threading.BoundedSemaphore] = {}


def _ca_bundle(cfg: FetchConfig) -> str | None:
    path = cfg.ca_bundle or os.environ.get("FDREAMER_CA_BUNDLE") or os.environ.get("SSL_CERT_FILE")
    if path and not os.path.isfile(path):  # a configuration error: fail loudly, not as a quarantine row per URL
        raise ValueError(f"CA bundle {path!r} (ca_bundle, $FDREAMER_CA_BUNDLE or $SSL_CERT_FILE) is no file")
    if not path:
        with contextlib.suppress(ImportError):  # without certifi, urllib3 uses the system store
            import certifi

            path = certifi.where()
    return path or None


def _pool_manager(ca_bundle: str | None) -> urllib3.PoolManager:
    with _lock:  # maxsize: idle connections kept per host (more may be open: block=False never waits)
        if (pm := _pools.get((os.getpid(), ca_bundle))) is None:
            pm = _pools[(os.getpid(), ca_bundle)] = urllib3.PoolManager(
                num_pools=64, maxsize=32, block=False, cert_reqs="CERT_REQUIRED", ca_certs=ca_bundle)
        return pm


@contextlib.contextmanager
def _host_slot(host: str, per_host: int, deadline: float) -> Iterator[None]:
    """Hold one of the ``per_host`` slots of ``host`` (this process) for one request, never past the deadline."""
    with _lock:
        sem = _slots.setdefault((os.getpid(), host, per_host), threading.BoundedSemaphore(per_host))
    if not sem.acquire(timeout=max(0.0, deadline - time.monotonic())):
        raise _Failure("timeout", f"waited total_timeout_s for one of {per_host} slots of {host}", retry=False)
    try:
        yield
    finally:
        sem.release()


def _retry_after(value: str | None) -> float | None:
    """The seconds a ``Retry-After`` (a number or an HTTP date) asks for; None when absent or malformed."""
    if value and value.strip().isdigit():
        return float(value)
    with contextlib.suppress(TypeError, ValueError):
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    return None


def _transport_failure(e: BaseException, deadline: float, in_body: bool, known_length: bool) -> _Failure:
    """Map a urllib3/socket error to a failure; order matters (NewConnectionError is a ConnectTimeoutError)."""
    detail = f"{type(e).__name__}: {e}"
    if isinstance(e, u3e.NewConnectionError):
        return _Failure("connection_failed", detail)
    if isinstance(e, (u3e.TimeoutError, TimeoutError)):  # past the deadline: no retry
        late = time.monotonic() >= deadline
        return _Failure("timeout", f"total_timeout_s reached ({detail})" if late else detail, retry=not late)
    if isinstance(e, u3e.SSLError) and isinstance((e.args or [None])[0], ssl.SSLCertVerificationError):
        return _Failure("tls", detail, retry=False)
    return _Failure("truncated" if in_body and known_length else "connection_failed", detail)


def _read_body(resp: urllib3.HTTPResponse, want: int | None, known: bool, cfg: FetchConfig, deadline: float) -> bytes:
    """Up to ``want`` bytes (all when None), checking the deadline and max_bytes between socket reads."""
    buf = bytearray()
    sock = getattr(resp.connection, "sock", None)
    while want is None or len(buf) < want:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _Failure("timeout", f"body not complete within total_timeout_s={cfg.total_timeout_s} "
                           f"({len(buf)} bytes so far)", retry=False)
        if sock is not None:
            sock.settimeout(min(cfg.read_timeout_s, left))  # inactivity timeout, never past the deadline
        try:
            data = resp.read1(_CHUNK if want is None else min(_CHUNK, want - len(buf)), decode_content=False)
        except (u3e.HTTPError, OSError) as e:
            raise _transport_failure(e, deadline, in_body=True, known_length=known) from e
        if not data:
            break
        buf += data
        if len(buf) > cfg.max_bytes:
            raise _Failure("too_large", f"body exceeds max_bytes={cfg.max_bytes}", retry=False)
    return bytes(buf)


def _attempt(pm: urllib3.PoolManager, url: str, cfg: FetchConfig, byte_range: tuple[int, int] | None,
             deadline: float) -> bytes:
    """One attempt: follow redirects (each hop holding its host's slot), check status and length, read."""
    headers = {"Accept-Encoding": "identity", "User-Agent": "fdreamer-fetch"}
    if byte_range is not None:
        headers["Range"] = f"bytes={byte_range[0]}-{byte_range[0] + byte_range[1] - 1}"
    for _hop in range(cfg.max_redirects + 1):
        host = (urllib3.util.parse_url(url).host or "").lower()
        with _host_slot(host, cfg.per_host, deadline):
            left = deadline - time.monotonic()
            timeout = urllib3.Timeout(connect=min(cfg.connect_timeout_s, left), read=min(cfg.read_timeout_s, left))
            try:
                resp = pm.request("GET", url, headers=headers, preload_content=False, decode_content=False,
                                  redirect=False, retries=False, timeout=timeout)
            except (u3e.HTTPError, OSError) as e:
                raise _transport_failure(e, deadline, in_body=False, known_length=False) from e
            try:
                status = resp.status
                if status in (301, 302, 303, 307, 308) and resp.headers.get("Location"):
                    url = urljoin(url, resp.headers["Location"])
                    continue
                if status == 429 or status >= 500:
                    reason = "http_4xx" if status == 429 else "http_5xx_after_retries"
                    raise _Failure(reason, f"HTTP {status}", status, retry_after=_retry_after(
                        resp.headers.get("Retry-After") if status in (429, 503) else None))
                if not 200 <= status < 300:  # 404, other 4xx, a 3xx without Location, 1xx
                    raise _Failure("http_404" if status == 404 else "http_4xx", f"HTTP {status}", status, retry=False)
                length_n = int(n) if (n := resp.headers.get("Content-Length", "").strip()).isdigit() else None
                offset, want = 0, length_n
                if byte_range is not None and status == 206:
                    want = _check_content_range(resp.headers.get("Content-Range", ""), byte_range, length_n)
                elif byte_range is not None:  # a 200: the whole body, of which we need a prefix
                    offset, need = byte_range[0], byte_range[0] + byte_range[1]
                    want = need if length_n is None else min(need, length_n)
                if want is not None and want > cfg.max_bytes:
                    raise _Failure("too_large", f"{want} bytes exceed max_bytes={cfg.max_bytes}", status, retry=False)
                body = _read_body(resp, want, length_n is not None, cfg, deadline)
                if want is not None and len(body) < want and (status == 206 or length_n is not None):
                    raise _Failure("truncated", f"got {len(body)} of {want} bytes", status)
                return body[offset:]
            finally:
                if not resp.isclosed():
                    resp.close()  # a body left unread (error, redirect, a prefix): never reuse the connection
                resp.release_conn()
    raise _Failure("http_4xx", f"more than max_redirects={cfg.max_redirects} redirects", None, retry=False)


def _check_content_range(value: str, byte_range: tuple[int, int], length: int | None) -> int:
    """The length of a 206 body, once its ``Content-Range`` answers the range asked (or its part in the file)."""
    offset, size = byte_range
    m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", value.strip())
    first, last = (int(m.group(1)), int(m.group(2))) if m else (-1, -1)
    ends_file = m is not None and m.group(3) != "*" and last == int(m.group(3)) - 1
    if first != offset or last < first or not (last == offset + size - 1 or (ends_file and last < offset + size)):
        raise _Failure("truncated", f"206 Content-Range {value!r} does not answer bytes={offset}+{size}", 206)
    if length is not None and length != last - first + 1:
        raise _Failure("truncated", f"206 Content-Length {length} != Content-Range {value!r}", 206)
    return last - first + 1


def fetch(url: str, cfg: FetchConfig | None = None, byte_range: tuple[int, int] | None = None) -> bytes:
    """The body of ``url`` (or ``byte_range=(offset, size)`` of it; a range past the end of the file gives the
    bytes up to the end, as a file read would); :class:`FetchError` when it cannot be had."""
    cfg = cfg or FetchConfig()
    parsed = urllib3.util.parse_url(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"fetch takes http(s) URLs, got {url!r}")
    if byte_range is not None and (byte_range[0] < 0 or byte_range[1] < 1):
        raise ValueError(f"byte_range must be (offset >= 0, size >= 1), got {byte_range!r}")
    deadline, pm = time.monotonic() + cfg.total_timeout_s, _pool_manager(_ca_bundle(cfg))
    attempts = 0
    while True:
        attempts += 1
        try:
            return _attempt(pm, url, cfg, byte_range, deadline)
        except _Failure as f:
            wait = cfg.backoff_s * 2 ** (attempts - 1) * random.uniform(0.5, 1.5)
            if f.retry_after is not None:
                wait = max(wait, min(f.retry_after, cfg.max_retry_after_s))
            late = f.retry and attempts <= cfg.retries and time.monotonic() + wait >= deadline
            if not f.retry or attempts > cfg.retries or late:  # a late retry reports what failed, not the deadline
                detail = f"{f.detail}; no time left in total_timeout_s to retry" if late else f.detail
                raise FetchError(url, f.reason, f.status, attempts, detail) from None
            time.sleep(wait)


def prefetch(items: Iterable[T], fetch_one: Callable[[T], bytes],
             depth: int) -> Iterator[tuple[T, bytes | BaseException]]:
    """``(item, bytes or the exception fetch_one raised)`` in input order, the next ``depth`` items downloading
    in threads while the caller decodes the current one (``depth=0``: inline). Closing the generator early
    cancels the fetches not yet started (running ones finish in the background)."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ValueError(f"prefetch depth must be an int >= 0, got {depth!r}")
    if depth == 0:
        for item in items:
            try:
                result: bytes | BaseException = fetch_one(item)
            except Exception as e:  # noqa: BLE001 - handed to the caller as an item
                result = e
            yield item, result
        return
    source = iter(items)
    window: deque[tuple[T, Future]] = deque()
    pool = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="fdreamer-prefetch")
    try:
        while True:
            for item in source:
                window.append((item, pool.submit(fetch_one, item)))
                if len(window) > depth:
                    break
            if not window:
                return
            item, future = window.popleft()
            yield item, future.exception() or future.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
