"""Fixtures for image-input tests: sample images, a listener that records connections, and a local
HTTP server whose routes misbehave in the ways RELIABILITY §3.3 lists."""

from __future__ import annotations

import gzip
import io
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from PIL import Image


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


SAMPLE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8))
SAMPLE_PNG = encode(SAMPLE, "PNG")


@pytest.fixture
def encode_image() -> Callable[..., bytes]:
    return encode


@pytest.fixture
def sample() -> tuple[Image.Image, bytes]:
    """An 8x6 RGB noise image and its PNG bytes."""
    return SAMPLE, SAMPLE_PNG


class Listener:
    """A listening TCP socket nobody should reach. Connections complete in the kernel backlog even
    without accept(), so after the code under test returns, a non-blocking accept tells whether it
    connected: no thread, no race."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]

    def connections(self) -> int:
        self.sock.setblocking(False)
        count = 0
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return count
            conn.close()
            count += 1


@pytest.fixture
def listener():
    lst = Listener()
    yield lst
    lst.sock.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        parts = urlsplit(self.path)
        self.server.log.append((parts.path, self.headers.get("Host")))
        route = getattr(
            self,
            "route_" + parts.path.strip("/").split("/")[0].replace("-", "_").replace(".", "_"),
            None,
        )
        if route is None:
            return self.reply(404, b"not found", "text/plain")
        try:
            route(parts)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up, as it should

    def reply(self, status: int, body: bytes, ctype: str = "image/png", **headers) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def redirect(self, location: str, status: int = 302) -> None:
        self.send_response(status)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def route_img_png(self, parts) -> None:
        self.reply(200, SAMPLE_PNG)

    def route_octet(self, parts) -> None:
        self.reply(200, SAMPLE_PNG, "application/octet-stream")

    def route_html(self, parts) -> None:
        self.reply(200, b"<html><body>hello</body></html>", "text/html")

    def route_fake_png(self, parts) -> None:
        self.reply(200, b"<html><body>hello</body></html>", "image/png")

    def route_error(self, parts) -> None:
        self.reply(500, b"oops", "text/plain")

    def route_redirect(self, parts) -> None:
        # /redirect/N: N redirects, then the image.
        n = int(parts.path.split("/")[2])
        self.redirect(f"/redirect/{n - 1}" if n > 1 else "/img.png")

    def route_to(self, parts) -> None:
        self.redirect(parse_qs(parts.query)["u"][0])

    def route_relative(self, parts) -> None:
        self.redirect("img.png")

    def route_no_location(self, parts) -> None:
        self.send_response(302)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def route_trickle_body(self, parts) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(SAMPLE_PNG)))
        self.end_headers()
        self.trickle(SAMPLE_PNG)

    def route_trickle_headers(self, parts) -> None:
        self.trickle(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nX-Slow: " + b"a" * 1000)

    def trickle(self, data: bytes) -> None:
        for i in range(len(data)):
            self.wfile.write(data[i : i + 1])
            self.wfile.flush()
            time.sleep(0.03)

    def route_endless(self, parts) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunk = b"%x\r\n%s\r\n" % (65536, b"\0" * 65536)
        for _ in range(10_000):  # ~650 MB if nobody stops reading
            self.wfile.write(chunk)

    def route_huge_length(self, parts) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(10**12))
        self.end_headers()
        self.wfile.write(SAMPLE_PNG)

    def route_short_then_stall(self, parts) -> None:
        # Content-Length promises more than is sent; the connection stays open.
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(SAMPLE_PNG) + 100))
        self.end_headers()
        self.wfile.write(SAMPLE_PNG)
        self.wfile.flush()
        time.sleep(1.0)

    def route_short_then_close(self, parts) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(SAMPLE_PNG) + 100))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(SAMPLE_PNG)
        self.close_connection = True

    def route_understated(self, parts) -> None:
        # Content-Length says 20 bytes; the image is longer: only 20 may be read.
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", "20")
        self.end_headers()
        self.wfile.write(SAMPLE_PNG)

    def route_gzip(self, parts) -> None:
        self.reply(200, gzip.compress(SAMPLE_PNG), "image/png", Content_Encoding="gzip")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    log: list[tuple[str, str | None]]


def start_server(wrap: Callable[[socket.socket], socket.socket] | None = None) -> _Server:
    server = _Server(("127.0.0.1", 0), _Handler)
    server.log = []
    if wrap is not None:
        server.socket = wrap(server.socket)
    threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    ).start()
    return server


@pytest.fixture
def start_http_server():
    """``start(wrap=None)`` starts a local HTTP server (``wrap`` may turn its socket into TLS);
    ``server.server_address[1]`` is its port, ``server.log`` the (path, Host) of every request."""
    servers: list[_Server] = []

    def start(wrap: Callable[[socket.socket], socket.socket] | None = None) -> _Server:
        servers.append(start_server(wrap))
        return servers[-1]

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def http_server(start_http_server):
    return start_http_server()


@pytest.fixture
def tls_server(tmp_path, start_http_server):
    """HTTPS server with a self-signed certificate for img.example.com; records the SNI names."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    try:
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", "/CN=img.example.com",
             "-addext", "subjectAltName=DNS:img.example.com",
             "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("the openssl command is needed to make a test certificate")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    names: list[str | None] = []
    server_ctx.sni_callback = lambda sock, name, ctx: names.append(name)
    server = start_http_server(lambda s: server_ctx.wrap_socket(s, server_side=True))
    return server, cert, names
