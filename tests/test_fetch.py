"""fdreamer.data.fetch against a real fault-injecting HTTP(S) server on loopback (helpers/http_faults.py)."""

from __future__ import annotations

import dataclasses
import os
import pickle
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.http_faults import FaultServer

from fdreamer.data import quarantine
from fdreamer.data.fetch import FETCH_REASONS, FetchConfig, FetchError, fetch, prefetch

SIZE = 256 * 1024
FAST = FetchConfig(connect_timeout_s=2, read_timeout_s=2, total_timeout_s=10, retries=2, backoff_s=0.01)


@pytest.fixture(autouse=True)
def _no_ca_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CA bundle comes from each test's config, not from the machine's environment."""
    monkeypatch.delenv("FDREAMER_CA_BUNDLE", raising=False)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "clip.bin").write_bytes(os.urandom(SIZE))
    return tmp_path


@pytest.fixture
def data(root: Path) -> bytes:
    return (root / "clip.bin").read_bytes()


@pytest.fixture
def server(root: Path) -> Iterator[FaultServer]:
    with FaultServer(root) as s:
        yield s


def cfg(**changes: object) -> FetchConfig:
    return dataclasses.replace(FAST, **changes)


def fails(url: str, config: FetchConfig, byte_range: tuple[int, int] | None = None) -> FetchError:
    with pytest.raises(FetchError) as info:
        fetch(url, config, byte_range)
    return info.value


def test_body_and_byte_ranges(server: FaultServer, data: bytes) -> None:
    assert fetch(server.url("clip.bin"), FAST) == data
    assert fetch(server.url("clip.bin"), FAST, (1000, 5000)) == data[1000:6000]  # a 206
    assert fetch(server.url("norange/clip.bin"), FAST, (1000, 5000)) == data[1000:6000]  # a 200, sliced
    assert fetch(server.url("chunked/clip.bin"), FAST, (1000, 5000)) == data[1000:6000]  # a 206, chunked
    assert fetch(server.url("clip.bin"), FAST, (SIZE - 10, 100)) == data[-10:]  # past the end: up to it
    assert fetch(server.url("chunked/clip.bin"), FAST) == data
    # a 200 that ignored Range counts toward max_bytes (only the prefix we need is read)
    assert fails(server.url("norange/clip.bin"), cfg(max_bytes=5000), (1000, 5000)).reason == "too_large"
    e = fails(server.url("clip.bin"), FAST, (SIZE + 10, 5))
    assert (e.reason, e.status, e.attempts) == ("http_4xx", 416, 1)


def test_404_and_redirects(server: FaultServer, data: bytes) -> None:
    e = fails(server.url("404/clip.bin"), FAST)
    assert (e.reason, e.status, e.attempts) == ("http_404", 404, 1)
    assert server.requests["/404/clip.bin"] == 1  # not retried
    assert fails(server.url("missing.bin"), FAST).reason == "http_404"
    assert fetch(server.url("redirect/clip.bin"), FAST) == data
    assert fetch(server.url("redirect/redirect/clip.bin"), FAST, (10, 20)) == data[10:30]
    assert fails(server.url("redirect/404/clip.bin"), FAST).reason == "http_404"
    e = fails(server.url("redirect/redirect/clip.bin"), cfg(max_redirects=1))
    assert (e.reason, e.attempts) == ("http_4xx", 1) and "max_redirects" in str(e)
    assert fails(server.url("403/clip.bin"), FAST).reason == "http_4xx"
    assert server.requests["/403/clip.bin"] == 1


def test_5xx_is_retried(server: FaultServer, data: bytes) -> None:
    assert fetch(server.url("500x2/clip.bin"), FAST) == data
    assert server.requests["/500x2/clip.bin"] == 3
    e = fails(server.url("503/clip.bin"), cfg(retries=3))
    assert (e.reason, e.status, e.attempts) == ("http_5xx_after_retries", 503, 4)
    assert server.requests["/503/clip.bin"] == 4
    assert "reason=http_5xx_after_retries" in str(e) and "attempts=4" in str(e) and e.url in str(e)
    e = fails(server.url("429/clip.bin"), cfg(retries=1))
    assert (e.reason, e.status, e.attempts) == ("http_4xx", 429, 2)


def test_retry_after_is_honoured_up_to_its_cap(root: Path, data: bytes) -> None:
    with FaultServer(root, retry_after="1") as server:
        start = time.monotonic()
        assert fetch(server.url("503x1/clip.bin"), FAST) == data
        assert time.monotonic() - start >= 0.9
        start = time.monotonic()
        assert fetch(server.url("429x1/clip.bin"), cfg(max_retry_after_s=0.05)) == data
        assert time.monotonic() - start < 0.8
        # a Retry-After that does not fit in the deadline ends the retries at once, with what failed
        start = time.monotonic()
        e = fails(server.url("503/clip.bin"), cfg(total_timeout_s=0.5))
        assert (e.reason, e.attempts) == ("http_5xx_after_retries", 1) and time.monotonic() - start < 0.4


def test_stall_times_out_and_the_server_still_stops(root: Path) -> None:
    server = FaultServer(root).start()
    try:
        start = time.monotonic()
        e = fails(server.url("stall/clip.bin"), cfg(read_timeout_s=0.3, retries=1))
        assert (e.reason, e.attempts) == ("timeout", 2)
        assert 0.5 < time.monotonic() - start < 3
        assert server.requests["/stall/clip.bin"] == 2
    finally:
        start = time.monotonic()
        server.stop()  # the stalled handlers are still waiting
        assert time.monotonic() - start < 2


def test_truncated_body(server: FaultServer) -> None:
    e = fails(server.url("truncate/clip.bin"), FAST)
    assert (e.reason, e.attempts) == ("truncated", 3)
    assert server.requests["/truncate/clip.bin"] == 3


def test_too_large(server: FaultServer, data: bytes) -> None:
    e = fails(server.url("clip.bin"), cfg(max_bytes=SIZE - 1))  # by Content-Length, before reading
    assert (e.reason, e.attempts) == ("too_large", 1) and str(SIZE) in str(e)
    e = fails(server.url("chunked/clip.bin"), cfg(max_bytes=SIZE // 2))  # no Content-Length: by count
    assert (e.reason, e.attempts) == ("too_large", 1)
    assert fetch(server.url("clip.bin"), cfg(max_bytes=SIZE // 2), (0, 100)) == data[:100]


def test_slow_trickle_ends_at_the_total_deadline(root: Path) -> None:
    with FaultServer(root, trickle_bytes=512, trickle_interval_s=0.02) as server:  # ~10 s for the file
        start = time.monotonic()
        e = fails(server.url("slowchunks/clip.bin"), cfg(read_timeout_s=0.5, total_timeout_s=1.0, retries=3))
        took = time.monotonic() - start
    assert (e.reason, e.attempts) == ("timeout", 1) and "total_timeout_s" in str(e)
    assert 0.9 < took < 2.0


def test_connection_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    e = fails(f"http://127.0.0.1:{port}/clip.bin", cfg(retries=1))
    assert (e.reason, e.status, e.attempts) == ("connection_failed", None, 2)


def test_https_with_and_without_the_ca_bundle(root: Path, data: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    with FaultServer(root, https=True) as server:
        assert server.url("x").startswith("https://127.0.0.1:") and server.ca_file is not None
        assert fetch(server.url("500x1/clip.bin"), cfg(ca_bundle=str(server.ca_file))) == data
        assert fetch(server.url("clip.bin"), cfg(ca_bundle=str(server.ca_file)), (5, 10)) == data[5:15]
        e = fails(server.url("clip.bin"), cfg(retries=3))
        assert (e.reason, e.attempts) == ("tls", 1) and "CERTIFICATE_VERIFY_FAILED" in str(e)
        monkeypatch.setenv("FDREAMER_CA_BUNDLE", str(server.ca_file))
        assert fetch(server.url("clip.bin"), FAST) == data
    monkeypatch.setenv("FDREAMER_CA_BUNDLE", str(root / "no-such.pem"))
    with pytest.raises(ValueError, match="no-such.pem"):
        fetch("https://127.0.0.1:1/x", FAST)


def test_per_host_limit(root: Path, data: bytes) -> None:
    with FaultServer(root, delay_s=0.15) as server:
        results: list[bytes | BaseException] = []

        def one() -> None:
            try:
                results.append(fetch(server.url("delay/clip.bin"), cfg(per_host=3)))
            except BaseException as e:  # noqa: BLE001 - asserted below
                results.append(e)

        threads = [threading.Thread(target=one) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert results == [data] * 16
        assert server.requests["/delay/clip.bin"] == 16
        assert 2 <= server.max_in_flight <= 3  # concurrent, but never more than per_host


def test_prefetch_order_errors_and_overlap(server: FaultServer, data: bytes) -> None:
    urls = [server.url(p) for p in ("clip.bin", "404/clip.bin", "redirect/clip.bin", "chunked/clip.bin")]
    for depth in (0, 1, 3):
        out = list(prefetch(urls, lambda u: fetch(u, FAST), depth))
        assert [u for u, _ in out] == urls
        assert [r for _, r in out if isinstance(r, bytes)] == [data] * 3
        assert isinstance(out[1][1], FetchError) and out[1][1].reason == "http_404"

    started = {i: threading.Event() for i in range(4)}

    def slow(i: int) -> bytes:
        started[i].set()
        return fetch(server.url("clip.bin"), FAST)

    for i, body in prefetch(range(4), slow, depth=2):
        assert body == data
        if i < 3:  # item i+1 downloads while the consumer still works on item i
            assert started[i + 1].wait(5)


def test_prefetch_closed_early_cancels_what_has_not_started() -> None:
    consumed: list[int] = []
    ran: list[int] = []

    def source() -> Iterator[int]:
        for i in range(20):
            consumed.append(i)
            yield i

    def fetch_one(i: int) -> bytes:
        ran.append(i)
        time.sleep(0.1)
        return b"x"

    gen = prefetch(source(), fetch_one, depth=2)
    assert next(gen) == (0, b"x")
    gen.close()
    time.sleep(0.4)
    assert consumed == [0, 1, 2] and set(ran) <= {0, 1, 2}
    with pytest.raises(ValueError, match="depth"):
        next(prefetch([1], fetch_one, -1))


def test_fetch_error_reasons_classify_and_pickle() -> None:
    for reason in FETCH_REASONS:
        e = FetchError("https://h/x.mp4", reason, 503 if reason.startswith("http") else None, 4, "boom")
        assert quarantine.classify(e) == reason and reason in quarantine.REASONS
        back = pickle.loads(pickle.dumps(e))
        assert (back.url, back.reason, back.status, back.attempts, str(back)) == (e.url, reason, e.status, 4, str(e))
        assert isinstance(e, OSError)
    assert quarantine.classify(FetchError("https://h/x", "timeout")) == "timeout"  # not decode_timeout
    with pytest.raises(ValueError, match="reason"):
        FetchError("https://h/x", "nope")


@pytest.mark.parametrize("field, value", [("connect_timeout_s", 0), ("read_timeout_s", -1), ("total_timeout_s", "5"),
                                          ("retries", -1), ("retries", 1.5), ("backoff_s", -0.1), ("max_bytes", 0),
                                          ("per_host", 0), ("per_host", True), ("max_redirects", -1),
                                          ("ca_bundle", "/no/such/ca.pem")])
def test_config_validation(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"FetchConfig.{field} must be"):
        FetchConfig(**{field: value})


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="http"):
        fetch("s3://bucket/key.mp4")
    with pytest.raises(ValueError, match="byte_range"):
        fetch("http://127.0.0.1:1/x", FAST, (0, 0))
