"""Media URLs through a proxy named by the environment: the proxy is told the checked address,
never the name, so the SSRF checks hold behind it; no_proxy, credentials, refusals and proxy
schemes we do not speak. A small proxy runs on 127.0.0.1 and forwards every tunnel and request to
the local test server, whatever address it is asked for."""

from __future__ import annotations

import socket
import ssl
import threading

import pytest

from vlmdeploy.errors import ImageError
from vlmdeploy.vl import MediaPolicy, fetch, load_image
from vlmdeploy.vl.proxy import parse_proxy, proxy_for

PUBLIC_IP = "93.184.216.34"


class TinyProxy:
    """Records (method, target, Proxy-Authorization) of every request and forwards the bytes to
    127.0.0.1:``upstream``; with ``refuse`` it answers CONNECT with that status instead."""

    def __init__(self, upstream: int, refuse: int | None = None):
        self.upstream, self.refuse, self.log = upstream, refuse, []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _handle(self, client: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = client.recv(1)
            if not chunk:
                return
            head += chunk
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
        self.log.append((method, target, headers.get("Proxy-Authorization")))
        if method == "CONNECT" and self.refuse:
            client.sendall(f"HTTP/1.1 {self.refuse} Forbidden\r\n\r\n".encode())
            client.close()
            return
        upstream = socket.create_connection(("127.0.0.1", self.upstream))
        if method == "CONNECT":
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            upstream.sendall(head)  # absolute form: the test server reads the path from it
        threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()
        self._pipe(client, upstream)

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def no_direct(monkeypatch):
    """Every direct connection the fetcher makes (there should be none through a proxy)."""
    log: list[tuple[str, int]] = []

    def open_socket(ip: str, port: int, timeout: float) -> socket.socket:
        log.append((ip, port))
        raise ConnectionRefusedError

    monkeypatch.setattr(fetch, "_open_socket", open_socket)
    return log


def public_dns(host: str, port: int) -> list[str]:
    if host.endswith("example.com"):
        return [PUBLIC_IP]
    raise socket.gaierror("no such name")


POLICY = MediaPolicy(resolver=public_dns, timeout_s=3)


def test_http_goes_to_the_proxy_with_the_checked_address(http_server, no_direct, monkeypatch):
    proxy = TinyProxy(http_server.server_address[1])
    monkeypatch.setenv("http_proxy", f"http://user:p%40ss@127.0.0.1:{proxy.port}")
    assert load_image("http://img.example.com/img.png", POLICY).size == (8, 6)
    assert no_direct == []
    # the proxy was told the address that was checked, the server still saw the name
    assert proxy.log == [("GET", f"http://{PUBLIC_IP}:80/img.png", "Basic dXNlcjpwQHNz")]
    assert http_server.log[-1] == ("/img.png", "img.example.com")
    proxy.close()


def test_https_tunnels_to_the_checked_address(tls_server, no_direct, monkeypatch):
    server, cert, names = tls_server
    proxy = TinyProxy(server.server_address[1])
    monkeypatch.setenv("HTTPS_PROXY", f"127.0.0.1:{proxy.port}")  # no scheme: taken as http://
    client_ctx = ssl.create_default_context(cafile=str(cert))
    monkeypatch.setattr(fetch, "_tls_context", lambda: client_ctx)
    assert load_image("https://img.example.com/img.png", POLICY).size == (8, 6)
    assert proxy.log == [("CONNECT", f"{PUBLIC_IP}:443", None)]
    assert names == ["img.example.com"] and no_direct == []  # TLS end to end, with the name
    assert server.log[-1] == ("/img.png", "img.example.com")
    proxy.close()


def test_private_targets_are_refused_before_the_proxy(http_server, no_direct, monkeypatch):
    proxy = TinyProxy(http_server.server_address[1])
    monkeypatch.setenv("all_proxy", f"http://127.0.0.1:{proxy.port}")
    policy = MediaPolicy.server_default(resolver=lambda h, p: ["10.0.0.7"], timeout_s=3)
    for url in ("http://internal.example.com/img.png", "https://127.0.0.1/img.png",
                "http://169.254.169.254/latest/meta-data"):
        with pytest.raises(ImageError) as info:
            load_image(url, policy)
        assert info.value.code == "invalid_image_url"
    assert proxy.log == [] and no_direct == []
    proxy.close()


def test_no_proxy_goes_direct(http_server, monkeypatch):
    proxy = TinyProxy(http_server.server_address[1])
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.setenv("NO_PROXY", "localhost,.example.com")
    dialled: list[tuple[str, int]] = []
    real = fetch._open_socket

    def open_socket(ip: str, port: int, timeout: float) -> socket.socket:
        dialled.append((ip, port))
        return real("127.0.0.1", http_server.server_address[1], timeout)

    monkeypatch.setattr(fetch, "_open_socket", open_socket)
    assert load_image("http://img.example.com/img.png", POLICY).size == (8, 6)
    assert dialled == [(PUBLIC_IP, 80)] and proxy.log == []
    assert proxy_for("http", "img.example.com", 80) is None
    assert proxy_for("http", "example.org", 80) is not None
    proxy.close()


def test_a_refused_tunnel_says_so(http_server, no_direct, monkeypatch):
    proxy = TinyProxy(http_server.server_address[1], refuse=403)
    monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{proxy.port}")
    with pytest.raises(ImageError) as info:
        load_image("https://img.example.com/img.png", POLICY)
    assert info.value.code == "invalid_image_url"
    assert "proxy refused the connection (HTTP 403)" in info.value.message
    proxy.close()


@pytest.mark.parametrize("url", ["socks5://127.0.0.1:1080", "https://proxy.example.com:8443"])
def test_proxy_schemes_we_do_not_speak_fail_loudly(url, no_direct, monkeypatch):
    monkeypatch.setenv("https_proxy", url)
    with pytest.raises(ImageError) as info:
        load_image("https://img.example.com/img.png", POLICY)
    assert "only http:// proxies are supported" in info.value.message
    assert no_direct == []  # never silently direct


def test_parse_proxy():
    p = parse_proxy("http://a%3Ab:c@proxy.local:3128")
    assert (p.host, p.port) == ("proxy.local", 3128)
    assert p.authorization == "Basic YTpiOmM="  # base64 of 'a:b:c'
    bare = parse_proxy("proxy.local")
    assert bare.port == 80 and bare.authorization is None
