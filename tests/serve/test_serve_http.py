"""RELIABILITY §3.1 (HTTP / transport), rows H1–H9, against the app around the FakePipeline.

Rows that need real sockets (H4 while streaming, H5, H7) run a real uvicorn on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from serve_helpers import assert_error, chat, make_client, run_live

from vlmdeploy.serve import ServerConfig, create_app
from vlmdeploy.serve import auth as auth_module

JSON = {"content-type": "application/json"}


# ---- H1 / H2 / H3 / H6: body parsing -----------------------------------------------------------


@pytest.mark.parametrize("body", [b"not json", b'{"messages": [', b"{'a': 1}", b"", b"\xff\xfe{"])
def test_h1_non_json_body_is_400_invalid_json(client, body):
    assert_error(client.post("/v1/chat/completions", content=body, headers=JSON), 400,
                 "invalid_json")


@pytest.mark.parametrize("body", [b"[1, 2]", b'"hello"', b"3", b"null", b"true"])
def test_h2_non_object_body_is_400_with_null_param(client, body):
    assert_error(client.post("/v1/chat/completions", content=body, headers=JSON), 400,
                 "invalid_json", param=None)


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded",
                                   "multipart/form-data; boundary=x"])
def test_h3_wrong_content_type_is_415(client, fake, ctype):
    response = client.post("/v1/chat/completions", content=b'{"messages": []}',
                           headers={"content-type": ctype})
    assert_error(response, 415, "unsupported_media_type")
    assert fake.prepared == []


def test_h3_json_with_charset_and_missing_content_type_are_accepted(client):
    body = b'{"messages": [{"role": "user", "content": "hi"}]}'
    ok = client.post("/v1/chat/completions", content=body,
                     headers={"content-type": "application/json; charset=utf-8"})
    assert ok.status_code == 200
    assert client.post("/v1/chat/completions", content=body).status_code == 200


@pytest.mark.parametrize("body", [b"[" * 100_000, b"[" * 100_000 + b"]" * 100_000,
                                  b'{"messages": ' + b"{\"a\":" * 50_000 + b"1" + b"}" * 50_001],
                         ids=["open", "closed", "objects"])
def test_h6_deep_nesting_is_400_not_500(client, body):
    assert_error(client.post("/v1/chat/completions", content=body, headers=JSON), 400,
                 "invalid_json")


def test_nan_and_infinity_literals_do_not_parse(client):
    for literal in (b"NaN", b"Infinity", b"-Infinity"):
        body = b'{"messages": [{"role": "user", "content": "hi"}], "temperature": ' + literal + b"}"
        assert_error(client.post("/v1/chat/completions", content=body, headers=JSON), 400,
                     "invalid_json")


# ---- H4: body size cap -------------------------------------------------------------------------


def test_h4_declared_length_over_cap_is_413_before_reading(fake):
    client = make_client(fake, max_body_bytes=4096)
    body = b'{"messages": [{"role": "user", "content": "' + b"x" * 8000 + b'"}]}'
    assert_error(client.post("/v1/chat/completions", content=body, headers=JSON), 413,
                 "request_too_large")
    assert fake.prepared == []


def _http_status(sock: socket.socket, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\r\n", 1)[0]


def test_h4_chunked_body_over_cap_is_refused_while_streaming(fake):
    """The 413 arrives while the client is still sending: the server never buffers the rest."""
    app = create_app(fake, ServerConfig(max_body_bytes=4096))
    with run_live(app) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(8):  # 8 KiB sent of a body that never ends
                sock.sendall(b"400\r\n" + b"x" * 1024 + b"\r\n")
            assert _http_status(sock).startswith(b"HTTP/1.1 413")
    assert fake.prepared == []


# ---- H5 / H7: header limits and slow clients (real uvicorn) ------------------------------------


def _closed_or_rejected(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    try:
        return sock.recv(4096) or b"<closed>"
    except ConnectionResetError:
        return b"<closed>"


@pytest.mark.parametrize("headers", [
    b"X-Big: " + b"a" * 100_000 + b"\r\n",
    b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 90) for i in range(1000)),
], ids=["100KB-header", "1000-headers"])
def test_h5_huge_headers_are_rejected(fake, headers):
    with run_live(create_app(fake)) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            try:
                sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # closed on us mid-send: also a rejection
            reply = _closed_or_rejected(sock, 5.0)
    assert reply == b"<closed>" or reply.startswith(b"HTTP/1.1 431"), reply[:80]


def test_h7_slowloris_headers_are_cut_off(fake):
    config = ServerConfig(header_timeout_s=0.5)
    with run_live(create_app(fake, config), config) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            start = time.monotonic()
            sock.sendall(b"GET /v1/models HTTP/1.1\r\n")
            closed = False
            for i in range(40):  # one header line every 0.1 s would take 4 s
                try:
                    sock.sendall(b"X-Slow-%d: 1\r\n" % i)
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
                time.sleep(0.1)
            if not closed:
                closed = _closed_or_rejected(sock, 1.0) == b"<closed>"
            assert closed
            assert time.monotonic() - start < 3.0


def test_h7_idle_connection_without_request_is_closed(fake):
    config = ServerConfig(header_timeout_s=0.3)
    with run_live(create_app(fake, config), config) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            assert _closed_or_rejected(sock, 3.0) == b"<closed>"


def test_h7_slow_body_times_out_with_408(fake):
    config = ServerConfig(body_timeout_s=0.5)
    with run_live(create_app(fake, config), config) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
            start = time.monotonic()
            assert _http_status(sock, 5.0).startswith(b"HTTP/1.1 408")
            assert time.monotonic() - start < 3.0
    assert fake.prepared == []


# ---- H8: unknown routes and methods ------------------------------------------------------------


def test_h8_unknown_route_is_404_in_envelope(client):
    assert_error(client.get("/v1/nope"), 404, "not_found")
    assert_error(client.post("/v2/chat/completions", json=chat()), 404, "not_found")


def test_h8_wrong_method_is_405_in_envelope(client):
    assert_error(client.get("/v1/chat/completions"), 405, "method_not_allowed")
    assert_error(client.post("/v1/models", json={}), 405, "method_not_allowed")


# ---- H9: API keys ------------------------------------------------------------------------------

# /metrics itself is open, as vLLM's (tests/serve/test_serve_metrics.py: --protect-metrics);
# other spellings of it are not
PROTECTED = [
    ("GET", "/v1/models"), ("GET", "/v1/models/fake-model"), ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"), ("GET", "//metrics"), ("GET", "/%6Detrics"),
    ("POST", "//v1/chat/completions"),
    ("POST", "/v1/%63hat/completions"), ("POST", "/v1//chat/completions"), ("GET", "/health/"),
    ("GET", "/%68ealth"), ("GET", "/HEALTH"), ("GET", "/nonexistent"), ("GET", "/docs"),
    ("GET", "/openapi.json"),
]


@pytest.fixture
def keyed(fake):
    return make_client(fake, api_keys=("sk-one", "sk-two"))


@pytest.mark.parametrize("method,path", PROTECTED)
@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "Basic sk-one", "Bearer ",
                                           "sk-one", "Bearer sk-one2"])
def test_h9_every_route_but_health_needs_the_key(keyed, fake, method, path, authorization):
    headers = {} if authorization is None else {"authorization": authorization}
    response = keyed.request(method, path, json=chat(), headers=headers)
    assert_error(response, 401, "invalid_api_key")
    assert response.json()["error"]["type"] == "invalid_request_error"  # what OpenAI sends
    assert fake.prepared == []


def test_h9_health_is_open_and_keys_work(keyed):
    assert keyed.get("/health").status_code == 200
    for key in ("sk-one", "sk-two"):
        headers = {"authorization": f"Bearer {key}"}
        assert keyed.get("/v1/models", headers=headers).status_code == 200
        assert keyed.post("/v1/chat/completions", json=chat(), headers=headers).status_code == 200
    assert keyed.get("/metrics", headers={"authorization": "bearer sk-two"}).status_code == 200


def test_h9_duplicate_authorization_headers_are_refused(keyed):
    headers = [("authorization", "Bearer wrong"), ("authorization", "Bearer sk-one")]
    assert_error(keyed.get("/v1/models", headers=headers), 401, "invalid_api_key")


def test_h9_root_path_prefix_does_not_open_health(fake):
    app = create_app(fake, ServerConfig(api_keys=("sk-one",)))
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/health", "raw_path": b"/x/health",
             "root_path": "/x", "headers": [], "query_string": b"", "http_version": "1.1",
             "scheme": "http", "server": ("t", 80), "client": ("c", 1)}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 401


def test_h9_every_key_is_compared_in_constant_time(fake, monkeypatch):
    calls = []
    real = auth_module.hmac.compare_digest

    def counting(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth_module.hmac, "compare_digest", counting)
    client = make_client(fake, api_keys=("k1", "a-much-longer-key-2", "k3"))
    for key in ("k1", "k3", "nope", "a-much-longer-key-2" * 50):
        calls.clear()
        client.get("/v1/models", headers={"authorization": f"Bearer {key}"})
        # every configured key is compared, on equal-length digests, whichever matches
        assert calls == [(32, 32)] * 3


def test_cors_preflight_is_answered_without_key(fake):
    client = make_client(fake, api_keys=("sk-one",), allow_origins=("https://app.example",))
    response = client.options("/v1/chat/completions", headers={
        "origin": "https://app.example", "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type"})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "https://app.example"
    assert_error(client.get("/v1/models", headers={"origin": "https://app.example"}), 401,
                 "invalid_api_key")

