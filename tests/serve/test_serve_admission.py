"""Connections that send nothing useful never crowd out real requests (RELIABILITY L16, H5, H7,
L1), over real sockets (uvicorn on 127.0.0.1) with the FakePipeline:

* a request takes one of `max_concurrent_requests` slots only once its body is read, so
  connections holding headers, half a body or half their headers get no slot;
* one client address may hold at most `max_connections_per_client` connections, the server at
  most `max_connections` (each extra one is answered 429 / 503 in OpenAI's envelope and closed);
* a header block of too many lines is 431, like one of too many bytes.

An attacking address is 127.0.0.2 (also loopback on Linux), the real client 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from fake_pipeline import FakePipeline
from serve_helpers import chat, run_live

from vlmdeploy.serve import ServerConfig, create_app

URL = "/v1/chat/completions"
BODY = json.dumps(chat("hi", max_tokens=2)).encode()
STALLS = {
    "headers-only": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(BODY),
    "half-body": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(BODY)
                 + BODY[:10],
    "half-headers": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Ty",
    "nothing": b"",
}


@contextlib.contextmanager
def stalled(port: int, count: int, data: bytes, source: str = "127.0.0.2") -> Iterator[list]:
    """`count` connections from `source` that send `data` and then nothing."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind((source, 0))
            sock.connect(("127.0.0.1", port))
            if data:
                sock.sendall(data)
            socks.append(sock)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def reply(sock: socket.socket, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data


def error_of(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)["error"]


@pytest.mark.parametrize("stall", sorted(STALLS))
def test_l16_stalled_connections_take_no_admission_slot(stall):
    """Two slots, 300 stalled connections: real requests are still served, not 429."""
    fake = FakePipeline()
    app = create_app(fake, ServerConfig(max_concurrent_requests=2))
    with run_live(app) as url, httpx.Client(base_url=url, timeout=10) as http:
        port = int(url.rsplit(":", 1)[1])
        with stalled(port, 300, STALLS[stall]):
            time.sleep(0.3)  # every stalled request that will reach the app has done so
            assert app.state.server.admission.in_flight == 0
            for _ in range(5):
                response = http.post(URL, json=chat("hi", max_tokens=2))
                assert response.status_code == 200, response.text
            assert http.get("/health").status_code == 200
        assert len(fake.prepared) == 5


def test_l16_one_address_cannot_hold_more_than_its_connections():
    config = ServerConfig(max_connections_per_client=20, max_concurrent_requests=2)
    app = create_app(FakePipeline(), config)
    with run_live(app, config) as url, httpx.Client(base_url=url, timeout=10) as http:
        port = int(url.rsplit(":", 1)[1])
        with stalled(port, 20, STALLS["headers-only"]):
            with stalled(port, 5, b"") as extra:  # one address's connections 21-25
                for sock in extra:
                    status, error = error_of(reply(sock))
                    assert status == 429 and error["code"] == "too_many_connections"
                    assert error["type"] == "rate_limit_error"
            # another address is not affected
            assert http.post(URL, json=chat("hi", max_tokens=2)).status_code == 200
        time.sleep(0.2)  # closed connections are counted out
        with stalled(port, 20, STALLS["headers-only"]):  # the address may connect again
            assert http.get("/health").status_code == 200


def test_l16_the_server_bounds_its_open_connections():
    config = ServerConfig(max_connections=30, max_connections_per_client=0)
    app = create_app(FakePipeline(), config)
    with run_live(app, config) as url:
        port = int(url.rsplit(":", 1)[1])
        with stalled(port, 30, b""), stalled(port, 3, b"", "127.0.0.3") as extra:
            for sock in extra:
                status, error = error_of(reply(sock))
                assert status == 503 and error["code"] == "too_many_connections"
                assert error["type"] == "service_unavailable_error"
        time.sleep(0.2)
        assert httpx.get(url + "/health").status_code == 200


@pytest.mark.parametrize("count", [129, 500])
def test_h5_too_many_header_lines_are_431(count):
    """Small headers, many of them (under the byte cap): refused by their count."""
    with run_live(create_app(FakePipeline())) as url:
        port = int(url.rsplit(":", 1)[1])
        headers = b"".join(b"X-%d: v\r\n" % i for i in range(count))
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
            status, error = error_of(reply(sock))
    assert status == 431 and error["code"] == "request_header_fields_too_large"


def test_h5_a_normal_number_of_headers_is_served():
    with run_live(create_app(FakePipeline())) as url:
        headers = {f"x-extra-{i}": "v" for i in range(60)}
        assert httpx.get(url + "/v1/models", headers=headers).status_code == 200
