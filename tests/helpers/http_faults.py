"""A real HTTP(S) file server on loopback that injects faults, for testing :mod:`fdreamer.data.fetch`.

    with FaultServer(root_dir, https=True) as server:
        fetch(server.url("500x2/clip.mp4"), FetchConfig(ca_bundle=str(server.ca_file)))
        assert server.requests["/500x2/clip.mp4"] == 3

Files under ``root_dir`` are served with ``Range`` support (206). A leading path segment picks a fault:

==================  ==========================================================================
``/404/<file>``     404
``/<code>xN/<f>``   status ``code`` (400-599) the first N requests of this path, then the file
``/<code>/<f>``     always ``code`` (``/503/``, ``/429/``; with ``Retry-After: retry_after``)
``/stall/<f>``      headers with the full Content-Length, half the body, then hang until stop
``/truncate/<f>``   Content-Length of the whole body, half of it, then close the connection
``/redirect/<r>``   302 to ``/<r>`` (faults compose: ``/redirect/404/f``)
``/chunked/<f>``    no Content-Length, chunked transfer encoding
``/slowchunks/<f>`` the body trickled (``trickle_bytes`` every ``trickle_interval_s``)
``/norange/<f>``    ignore ``Range``: always 200 with the whole file
``/delay/<f>``      wait ``delay_s`` before answering (to overlap concurrent requests)
==================  ==========================================================================

``requests`` counts requests per path, ``max_in_flight`` is the most requests answered at once. On
stop, hung handlers are released and every open connection is closed, so stopping never hangs.
"""

from __future__ import annotations

import datetime
import http.server
import ipaddress
import re
import socket
import ssl
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from types import TracebackType

_STATUS = re.compile(r"^([45]\d\d)(?:x(\d+))?$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def write_self_signed_cert(out_dir: Path) -> tuple[Path, Path]:
    """``(cert.pem, key.pem)``: a self-signed CA-style certificate for 127.0.0.1 and localhost."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fdreamer test server")])
    now = datetime.datetime.now(datetime.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, False, False, False), True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(ski, False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = out_dir / "cert.pem", out_dir / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # FaultServer.stop joins the handler threads itself, with a bound
    owner: FaultServer

    def finish_request(self, request: socket.socket, client_address: tuple) -> None:  # in the handler thread
        owner = self.owner
        if owner._tls is not None:
            request.settimeout(5)
            try:
                request = owner._tls.wrap_socket(request, server_side=True)
            except (OSError, ssl.SSLError):  # e.g. the client rejected our certificate
                request.close()
                return
            request.settimeout(None)
        with owner._lock:
            owner._connections.add(request)
            owner._threads.add(threading.current_thread())
        try:
            super().finish_request(request, client_address)
        finally:
            with owner._lock:
                owner._connections.discard(request)
            if owner._tls is not None:  # socketserver closes the raw socket, which wrap_socket detached
                request.close()

    def handle_error(self, request: object, client_address: tuple) -> None:
        pass  # a client that went away mid-body (timeouts under test) is expected, not noise


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        owner = self.server.owner
        path = self.path.split("?", 1)[0]
        with owner._lock:
            owner.requests[path] += 1
            count = owner.requests[path]
            owner._in_flight += 1
            owner.max_in_flight = max(owner.max_in_flight, owner._in_flight)
        try:
            self._answer(owner, path, count)
        except (ConnectionError, TimeoutError, ssl.SSLError, ValueError):  # ValueError: write to a closed file
            self.close_connection = True
        finally:
            with owner._lock:
                owner._in_flight -= 1

    def _status(self, code: int, extra: dict[str, str] | None = None) -> None:
        body = f"{code} {self.responses.get(code, ('',))[0]}\n".encode()
        self.send_response(code)
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _answer(self, owner: FaultServer, path: str, count: int) -> None:
        fault, _, rest = path.lstrip("/").partition("/")
        if fault == "redirect":
            self.send_response(302)
            self.send_header("Location", "/" + rest)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        status = _STATUS.match(fault)
        if status:
            times = status.group(2)
            if times is None or count <= int(times):
                code = int(status.group(1))
                retry = {"Retry-After": owner.retry_after} if code in (429, 503) and owner.retry_after else {}
                return self._status(code, retry)
        elif fault not in ("stall", "truncate", "chunked", "slowchunks", "norange", "delay"):
            fault, rest = "", path.lstrip("/")
        file = (owner.root / rest).resolve()
        if owner.root not in file.parents or not file.is_file():
            return self._status(404)
        data = file.read_bytes()
        if fault == "delay":
            owner._stop.wait(owner.delay_s)
        code, headers = 200, {"Accept-Ranges": "bytes"}
        wanted = self.headers.get("Range")
        if wanted and fault != "norange":
            span = _parse_range(wanted, len(data))
            if span is None:
                return self._status(416, {"Content-Range": f"bytes */{len(data)}"})
            code, headers["Content-Range"] = 206, f"bytes {span[0]}-{span[1]}/{len(data)}"
            data = data[span[0]:span[1] + 1]
        self.send_response(code)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Type", "application/octet-stream")
        if fault == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(data), 4096):
                piece = data[i:i + 4096]
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
            return
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if fault in ("stall", "truncate"):
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            if fault == "stall":
                owner._stop.wait()
            return
        if fault == "slowchunks":
            for i in range(0, len(data), owner.trickle_bytes):
                if owner._stop.wait(owner.trickle_interval_s):
                    break
                self.wfile.write(data[i:i + owner.trickle_bytes])
                self.wfile.flush()
            return
        self.wfile.write(data)


def _parse_range(value: str, size: int) -> tuple[int, int] | None:
    """``(first, last)`` of a single ``bytes=`` range within ``size``, or None when unsatisfiable."""
    m = _RANGE.match(value.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None
    if not m.group(1):  # suffix: the last N bytes
        return (max(0, size - int(m.group(2))), size - 1) if size and int(m.group(2)) else None
    first = int(m.group(1))
    last = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
    return (first, last) if first < size and first <= last else None


class FaultServer:
    """A ``ThreadingHTTPServer`` on ``127.0.0.1:<free port>`` in a daemon thread; a context manager."""

    def __init__(self, root_dir: str | Path, https: bool = False, *, delay_s: float = 0.2,
                 trickle_bytes: int = 256, trickle_interval_s: float = 0.02, retry_after: str | None = None) -> None:
        self.root = Path(root_dir).resolve()
        self.https = https
        self.delay_s, self.trickle_bytes, self.trickle_interval_s = delay_s, trickle_bytes, trickle_interval_s
        self.retry_after = retry_after
        self.requests: Counter[str] = Counter()
        self.max_in_flight = 0
        self.ca_file: Path | None = None
        self._in_flight = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._connections: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._tls: ssl.SSLContext | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> FaultServer:
        try:
            if self.https:
                self._tmp = tempfile.TemporaryDirectory(prefix="fault-server-")
                cert, key = write_self_signed_cert(Path(self._tmp.name))
                self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                self._tls.load_cert_chain(cert, key)
                self.ca_file = cert
            self._httpd = _Server(("127.0.0.1", 0), _Handler)
            self._httpd.owner = self
            self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                            name="fault-server", daemon=True)
            self._thread.start()
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def port(self) -> int:
        assert self._httpd is not None, "FaultServer not started"
        return self._httpd.server_address[1]

    def url(self, path: str) -> str:
        """``http(s)://127.0.0.1:PORT/<path>``."""
        return f"{'https' if self.https else 'http'}://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def stop(self, timeout_s: float = 5.0) -> None:
        """Release hung handlers, close open connections, stop serving and join every thread."""
        self._stop.set()
        alive: list[str] = []
        try:
            if self._httpd is not None:
                if self._thread is not None and self._thread.is_alive():
                    self._httpd.shutdown()
                with self._lock:
                    connections, threads = list(self._connections), list(self._threads)
                for conn in connections:
                    try:
                        conn.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    conn.close()
                self._httpd.server_close()
                self._httpd = None
                deadline = time.monotonic() + timeout_s
                for thread in threads:
                    thread.join(max(0.0, deadline - time.monotonic()))
                alive = [t.name for t in threads if t.is_alive()]
            if self._thread is not None:
                self._thread.join(timeout_s)
        finally:
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None
        if alive:
            raise RuntimeError(f"FaultServer handler threads did not stop within {timeout_s} s: {alive}")

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
