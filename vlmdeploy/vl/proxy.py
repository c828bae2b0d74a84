"""HTTP proxies from the environment for media URLs (``http_proxy``, ``https_proxy``,
``all_proxy`` and ``no_proxy``, upper or lower case, as curl, requests and httpx read them).

The SSRF checks do not move to the proxy: the fetcher still resolves the URL's host itself, checks
every address, and names the checked address to the proxy, so the proxy connects where the check
looked and a name that resolves differently at the proxy (rebinding) changes nothing.

* ``https://`` URLs go through a ``CONNECT address:port`` tunnel; TLS then runs end to end with
  the URL's host name in SNI and in the certificate check, so the proxy sees only ciphertext.
* ``http://`` URLs are sent to the proxy in absolute form, ``GET http://address:port/path``, with
  the URL's host in ``Host`` (most proxies refuse CONNECT to port 80).

Only ``http://`` proxies are supported; a proxy URL of another scheme (``socks5://``,
``https://``) makes the fetch fail with a message that says so, rather than silently going direct.
Credentials in the proxy URL are sent as ``Proxy-Authorization: Basic``. Without a DNS resolver
of its own a host behind such a proxy cannot check addresses, so its media URLs fail with "the host
name could not be resolved" (use data: URLs or local files there).
"""

from __future__ import annotations

import base64
import socket
import urllib.request
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from vlmdeploy.vl.media_policy import MSG_FETCH, fail


@dataclass(frozen=True)
class Proxy:
    host: str
    port: int
    authorization: str | None  # the Proxy-Authorization header's value


def proxy_for(scheme: str, host: str, port: int) -> Proxy | None:
    """The proxy the environment names for a URL of ``scheme`` on ``host``, or None (no proxy set
    for the scheme, or the host matched by ``no_proxy``)."""
    proxies = urllib.request.getproxies_environment()
    url = proxies.get(scheme) or proxies.get("all")
    if not url:
        return None
    if urllib.request.proxy_bypass_environment(host, proxies) or \
            urllib.request.proxy_bypass_environment(f"{host}:{port}", proxies):
        return None
    return parse_proxy(url)


def parse_proxy(url: str) -> Proxy:
    if "://" not in url:
        url = "http://" + url  # 'proxy.local:3128', as curl takes it
    try:
        parts = urlsplit(url)
        port = parts.port or 80
    except ValueError:
        raise fail("invalid_image_url", MSG_FETCH, "the proxy set in the environment is not a "
                   "valid URL") from None
    if parts.scheme.lower() != "http" or not parts.hostname:
        raise fail("invalid_image_url", MSG_FETCH,
                   f"only http:// proxies are supported, and the environment names a "
                   f"{parts.scheme or 'schemeless'}:// one")
    authorization = None
    if parts.username is not None:
        user_pass = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(user_pass.encode()).decode("ascii")
    return Proxy(parts.hostname, port, authorization)


def authority(address: str, port: int) -> str:
    """``address:port`` as a request target (IPv6 in brackets)."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def open_tunnel(sock: socket.socket, proxy: Proxy, address: str, port: int) -> None:
    """Ask the proxy on ``sock`` for a tunnel to ``address:port``; return once it answered 200
    (any bytes after its header belong to the tunnel, and a proxy sends none before the client
    speaks). The socket's timeout bounds each read."""
    target = authority(address, port)
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
    if proxy.authorization:
        lines.append(f"Proxy-Authorization: {proxy.authorization}")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("ascii"))
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)  # byte by byte: never read past the header into the tunnel
        if not chunk:
            raise fail("invalid_image_url", MSG_FETCH, "the proxy closed the connection")
        head += chunk
        if len(head) > 16384:
            raise fail("invalid_image_url", MSG_FETCH, "the proxy's answer is not valid HTTP")
    status = head.split(b"\r\n", 1)[0].split()
    if len(status) < 2 or not status[0].startswith(b"HTTP/") or not status[1].isdigit():
        raise fail("invalid_image_url", MSG_FETCH, "the proxy's answer is not valid HTTP")
    if status[1] != b"200":
        raise fail("invalid_image_url", MSG_FETCH,
                   f"the proxy refused the connection (HTTP {status[1].decode()})")
