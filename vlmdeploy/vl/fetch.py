"""The HTTP(S) transfer of an image, over connections to addresses :mod:`vlmdeploy.vl.ssrf` has
checked (standard library only).

The connection goes to a checked address, never to a fresh resolution of the name (pinning
defeats DNS rebinding), with the URL's host in ``Host`` and in TLS SNI and certificate checks.
Redirects are followed by hand, each hop parsed and checked from scratch, at most
``max_redirects``. ``Content-Encoding`` is refused (no automatic decompression, so no
decompression bombs); the body is read up to ``max_bytes`` whatever ``Content-Length`` says.
``timeout_s`` bounds the whole fetch, DNS, connection, TLS handshake, headers and body together,
not each read: a server trickling one byte at a time cannot stretch it. A ``cancel`` event (set by
another thread when the request's client has gone) stops the transfer at the next hop or within
``CANCEL_POLL_S`` of a read, so an abandoned download does not hold its preparation thread and
connection until the deadline.

Proxies named by the environment (``https_proxy``, ``no_proxy``, ...) are used as
:mod:`vlmdeploy.vl.proxy` describes, still to the checked address only.
"""

from __future__ import annotations

import functools
import http.client
import io
import re
import socket
import ssl
import threading
import time
from urllib.parse import urljoin

from vlmdeploy.errors import ImageError
from vlmdeploy.vl.media_policy import (
    MSG_CANCELLED,
    MSG_FETCH,
    MSG_TIMEOUT,
    MSG_TOO_LARGE,
    MSG_URL,
    MediaPolicy,
    fail,
)
from vlmdeploy.vl.proxy import Proxy, authority, open_tunnel, proxy_for
from vlmdeploy.vl.ssrf import (
    FetchTimeout,
    Target,
    check_host_allowed,
    checked_addresses,
    parse_http_url,
    remaining,
)


def _open_socket(ip: str, port: int, timeout: float) -> socket.socket:
    """TCP connection to an already checked address (tests substitute this to reroute)."""
    return socket.create_connection((ip, port), timeout=timeout)


def _open_proxy_socket(host: str, port: int, timeout: float) -> socket.socket:
    """TCP connection to the proxy the environment names (tests substitute this to reroute)."""
    return socket.create_connection((host, port), timeout=timeout)


@functools.lru_cache(maxsize=1)
def _default_tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()  # verifies chains and hostnames, TLS >= 1.2


def _tls_context() -> ssl.SSLContext:
    return _default_tls_context()


# How often a read waiting on a slow host looks at its cancel event.
CANCEL_POLL_S = 0.05


def _cancelled() -> ImageError:
    return fail("cancelled", MSG_CANCELLED)


class _DeadlineReader(io.RawIOBase):
    """Socket reads that each wait at most until the fetch deadline: a server trickling one byte at
    a time cannot stretch the fetch, whether in the headers or the body. With a cancel event, a
    read waits in slices of ``CANCEL_POLL_S`` and gives up once the event is set."""

    def __init__(
        self,
        raw: io.RawIOBase,
        sock: socket.socket,
        deadline: float,
        cancel: threading.Event | None = None,
    ):
        # `raw` is the socket's own file object: it keeps the socket open after the connection
        # object lets go of it (http.client does that when the server will close).
        self._raw, self._sock, self._deadline, self._cancel = raw, sock, deadline, cancel

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._cancel is None:
            self._sock.settimeout(remaining(self._deadline))
            return self._raw.readinto(buffer)
        while True:
            if self._cancel.is_set():
                raise _cancelled()
            # the socket directly: its file object refuses every read after one timeout
            self._sock.settimeout(min(remaining(self._deadline), CANCEL_POLL_S))
            try:
                return self._sock.recv_into(buffer)
            except TimeoutError:
                continue  # a slice has passed: look at the event, then wait again

    def close(self) -> None:
        self._raw.close()
        super().close()


class _DeadlineResponse(http.client.HTTPResponse):
    def __init__(
        self,
        sock: socket.socket,
        *args,
        deadline: float,
        cancel: threading.Event | None = None,
        **kwargs,
    ):
        super().__init__(sock, *args, **kwargs)
        self.fp = io.BufferedReader(_DeadlineReader(self.fp.detach(), sock, deadline, cancel))


class _PinnedConnection(http.client.HTTPConnection):
    """HTTP(S) to the URL's host name, but over a socket to the checked addresses only."""

    def __init__(
        self,
        target: Target,
        addresses: list[str],
        deadline: float,
        cancel: threading.Event | None = None,
        proxy: Proxy | None = None,
    ):
        super().__init__(target.host, target.port)
        if target.scheme == "https":
            self.default_port = 443  # Host header without ':443'
        self._target, self._addresses, self._deadline = target, addresses, deadline
        self._proxy = proxy
        self.response_class = functools.partial(
            _DeadlineResponse, deadline=deadline, cancel=cancel
        )

    def connect(self) -> None:
        if self._proxy is None:
            sock = self._connect_any()
        else:
            proxy = self._proxy
            sock = _open_proxy_socket(proxy.host, proxy.port, remaining(self._deadline))
            if self._target.scheme == "https":  # a tunnel to the checked address
                sock.settimeout(remaining(self._deadline))
                open_tunnel(sock, proxy, self._addresses[0], self._target.port)
        if self._target.scheme == "https":
            sock.settimeout(remaining(self._deadline))  # the handshake as a whole gets this
            sock = _tls_context().wrap_socket(sock, server_hostname=self._target.host)
        self.sock = sock

    def _connect_any(self) -> socket.socket:
        error: OSError = OSError()
        for ip in self._addresses:
            try:
                return _open_socket(ip, self._target.port, remaining(self._deadline))
            except FetchTimeout:
                raise
            except OSError as exc:
                error = exc
        raise error


_REDIRECTS = (301, 302, 303, 307, 308)


def fetch_http(
    url: str, policy: MediaPolicy, cancel: threading.Event | None = None, media: str = "image"
) -> bytes:
    """The body of ``url`` under ``policy``, every hop checked; any failure is an ImageError
    (code ``cancelled`` once ``cancel`` is set). ``media`` ("image" or "video") is the
    top-level type the answer's ``Content-Type`` may have (or a generic binary type)."""
    deadline = time.monotonic() + policy.timeout_s
    try:
        for _ in range(policy.max_redirects + 1):
            if cancel is not None and cancel.is_set():
                raise _cancelled()
            target = parse_http_url(url)
            check_host_allowed(target, policy)
            addresses = checked_addresses(target, policy, deadline)
            proxy = proxy_for(target.scheme, target.host, target.port)
            if proxy is not None:  # IPv4 first: a proxy may have no IPv6 route
                addresses.sort(key=lambda a: ":" in a)
            body, location = _request(target, addresses, policy, deadline, cancel, media, proxy)
            if location is None:
                return body
            url = urljoin(url, location)  # the next hop is parsed and checked from scratch
    except ImageError:
        raise
    except TimeoutError:
        raise fail("image_fetch_timeout", MSG_TIMEOUT) from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise fail("invalid_image_url", MSG_FETCH, _reason(exc)) from None
    raise fail("invalid_image_url", MSG_URL, f"more than {policy.max_redirects} redirects")


def _reason(exc: BaseException) -> str:
    """Why a transfer failed, in a fixed phrase (never the library's text, which may hold
    addresses)."""
    if isinstance(exc, ConnectionRefusedError):
        return "the connection was refused"
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return "the connection was closed by the server"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "the server's TLS certificate could not be verified"
    if isinstance(exc, ssl.SSLError):
        return "the TLS handshake failed"
    if isinstance(exc, socket.gaierror):
        return "the host name could not be resolved"
    if isinstance(exc, http.client.HTTPException):
        return "the server's answer is not valid HTTP"
    return "a network error"


def _request(
    target: Target,
    addresses: list[str],
    policy: MediaPolicy,
    deadline: float,
    cancel: threading.Event | None = None,
    media: str = "image",
    proxy: Proxy | None = None,
) -> tuple[bytes, str | None]:
    """One GET. Returns (body, None), or (b"", location) for a redirect."""
    conn = _PinnedConnection(target, addresses, deadline, cancel, proxy)
    try:
        if proxy is not None and target.scheme == "http":  # absolute form, to the checked address
            url = f"http://{authority(addresses[0], target.port)}{target.path}"
            conn.putrequest("GET", url, skip_host=True)  # also 'Accept-Encoding: identity'
            conn.putheader("Host", _host_header(target))
            if proxy.authorization:
                conn.putheader("Proxy-Authorization", proxy.authorization)
        else:
            conn.putrequest("GET", target.path)  # also sends Host and 'Accept-Encoding: identity'
        conn.putheader("User-Agent", "vlmdeploy")
        conn.putheader("Accept", f"{media}/*")
        conn.putheader("Connection", "close")
        conn.endheaders()
        response = conn.getresponse()
        if response.status in _REDIRECTS:
            location = response.getheader("Location")
            if not location:
                raise fail("invalid_image_url", MSG_FETCH, "a redirect without a Location")
            return b"", location
        _check_response(response, policy, media)
        return _read_capped(response, policy.max_bytes), None
    finally:
        conn.close()


def _host_header(target: Target) -> str:
    """The ``Host`` header http.client would send for ``target`` (port only when not default)."""
    host = f"[{target.host}]" if ":" in target.host else target.host
    default = 443 if target.scheme == "https" else 80
    return host if target.port == default else f"{host}:{target.port}"


_MEDIA_TYPE = re.compile(r"[a-z0-9.+-]{1,40}/[a-z0-9.+-]{1,60}")


def _check_response(
    response: http.client.HTTPResponse, policy: MediaPolicy, media: str = "image"
) -> None:
    if not 200 <= response.status < 300:
        raise fail("invalid_image_url", MSG_FETCH, f"the server answered HTTP {response.status}")
    encoding = (response.getheader("Content-Encoding") or "identity").strip().lower()
    transfer = (response.getheader("Transfer-Encoding") or "").strip().lower()
    if encoding != "identity" or transfer not in ("", "chunked"):  # no decompression (bombs)
        raise fail("invalid_image_url", MSG_FETCH,
                   "the answer is compressed (Content-Encoding), which is not accepted")
    ctype = (response.getheader("Content-Type") or "").split(";")[0].strip().lower()
    if ctype and not ctype.startswith(f"{media}/") and ctype not in _OPAQUE_TYPES:
        noun = "an image" if media == "image" else f"a {media}"
        shown = ctype if _MEDIA_TYPE.fullmatch(ctype) else f"not {noun} type"
        raise fail("invalid_image_url", MSG_FETCH,  # e.g. an HTML error page
                   f"the answer is {shown}, not {noun}")
    length = response.getheader("Content-Length") or ""
    if length.isdigit() and int(length) > policy.max_bytes:
        raise fail("image_too_large", MSG_TOO_LARGE)


# Hosts often serve images with a generic type; the magic bytes decide in the end.
_OPAQUE_TYPES = ("application/octet-stream", "binary/octet-stream")


def _read_capped(response: http.client.HTTPResponse, max_bytes: int) -> bytes:
    """Read at most ``max_bytes`` (one more to detect overflow), whatever Content-Length claims."""
    chunks, total = [], 0
    while total <= max_bytes:
        chunk = response.read(min(1 << 16, max_bytes + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    if total > max_bytes:
        raise fail("image_too_large", MSG_TOO_LARGE)
    if response.length:  # the server closed before sending all it announced
        raise fail("invalid_image_url", MSG_FETCH,
                   "the server closed the connection before the whole image arrived")
    return b"".join(chunks)
