"""Image input: fetch and decode untrusted images under explicit limits.

``load_image(source, policy)`` accepts a PIL image, raw bytes, a local path, a ``file://`` URL,
a ``data:image/...;base64,...`` URL or an http(s) URL, and returns an RGB ``PIL.Image.Image``.
Every failure raises ``vlmdeploy.errors.ImageError`` with a stable ``code`` and a fixed message
that never contains the input, a path, an address or a library's text.

What a `MediaPolicy` guarantees:

* Sizes are bounded before work is done: encoded bytes (``max_bytes``; for data URLs from the
  string length, before base64 decoding; for HTTP by capping the read, whatever
  ``Content-Length`` says) and pixels (``max_pixels``, from the image header, before decoding).
* The format is detected from magic bytes (not from a declared MIME type) and must be in
  ``allowed_formats``; PIL may only try that one decoder.
* HTTP(S) fetching (standard library only): strict URL parsing (no userinfo, no backslashes;
  numeric IPv4 forms such as ``0x7f000001`` and ``2130706433`` are recognised as the addresses
  they are), one DNS resolution per hop, every resolved address checked against the policy, and
  the connection made to that checked address (pinning defeats DNS rebinding) with the URL's
  host in ``Host`` and in TLS SNI / certificate checks. Redirects are followed by hand, each hop
  re-checked, at most ``max_redirects``. ``Content-Encoding`` is refused (no automatic
  decompression). ``timeout_s`` bounds the whole fetch, not each read.
* Local files only when ``allow_local_files``; with ``local_root`` set they must resolve
  (symlinks and ``..`` included) inside that directory. Only regular files are read.

Mode normalisation matches LMDeploy (``Image.open(...).convert("RGB")``, first frame): alpha is
dropped, not composited (RGBA, LA, PA keep their colour channels); palette images use their
palette colours (a tRNS entry is ignored); CMYK and grayscale use PIL's conversion; animated
GIF/WebP give their first frame; EXIF orientation is NOT applied (LMDeploy does not apply it
either, so the model sees the same pixels under both). One deliberate difference: 16-bit
grayscale (``I;16*``) is scaled to 8 bits (``v >> 8``), the way PIL already reads 16-bit RGB
PNGs, where PIL's ``convert("RGB")`` would clip every value above 255 to white.

All functions are pure (no module state is written) and safe to call from a thread pool.
"""

from __future__ import annotations

import base64
import binascii
import functools
import http.client
import io
import ipaddress
import os
import re
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urljoin, urlsplit

import numpy as np
from PIL import Image

from vlmdeploy.errors import ImageError
from vlmdeploy.vl.b64 import b64decode_strict

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Sequence[str]]

# Fixed, input-free messages (one per situation; the `code` is what clients should branch on).
_MSG_URL = "The image URL is invalid or not allowed."
_MSG_FETCH = "The image could not be fetched from its URL."
_MSG_LOCAL_DENIED = "Local image files are not allowed here."
_MSG_LOCAL_READ = "The local image file could not be read."
_MSG_FORMAT = "The image data could not be decoded."
_MSG_TYPE = "The image type is not supported."
_MSG_TOO_LARGE = "The image exceeds the size limit."
_MSG_TIMEOUT = "Fetching the image timed out."


def _fail(code: str, message: str) -> ImageError:
    return ImageError(message, code=code)


# ------------------------------------------------------------------------------------------ policy


@dataclass(frozen=True)
class MediaPolicy:
    """Limits and permissions for loading one image.

    The defaults suit the Python API (local paths work, as in LMDeploy); `server_default` suits
    requests from the network. With ``local_root`` set, relative paths are taken from it (else
    from the working directory). ``allowed_domains`` entries match exactly or as a parent domain.
    ``resolver(host, port) -> [ip, ...]`` replaces DNS resolution (custom DNS, tests); by default
    the system resolver (``getaddrinfo``) is used.
    """

    allow_local_files: bool = True
    local_root: str | None = None
    allow_private_networks: bool = False
    allowed_domains: tuple[str, ...] | None = None
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 64_000_000
    timeout_s: float = 10.0
    max_redirects: int = 3
    allowed_formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
    resolver: Resolver | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.max_pixels <= 0 or self.timeout_s <= 0:
            raise ValueError("max_bytes, max_pixels and timeout_s must be positive")
        if self.max_redirects < 0:
            raise ValueError("max_redirects must be >= 0")
        # Normalise containers and spellings once, so checks below are plain comparisons.
        formats = tuple(f.upper() for f in self.allowed_formats)
        object.__setattr__(self, "allowed_formats", formats)
        if self.allowed_domains is not None:
            domains = tuple(_normalise_domain(d) for d in self.allowed_domains)
            object.__setattr__(self, "allowed_domains", domains)

    @classmethod
    def server_default(cls, **overrides) -> MediaPolicy:
        """For requests from the network: no local files, no private or special addresses."""
        return cls(**{"allow_local_files": False, "allow_private_networks": False, **overrides})


def _normalise_domain(domain: str) -> str:
    domain = domain.strip().rstrip(".")
    if not domain.isascii():
        domain = domain.encode("idna").decode("ascii")
    return domain.lower()


# -------------------------------------------------------------------------------------- public API


def load_image(
    image: str | os.PathLike | bytes | Image.Image, policy: MediaPolicy | None = None
) -> Image.Image:
    """Load ``image`` (PIL image, bytes, path, ``file://``, ``data:`` or http(s) URL) as RGB."""
    policy = policy or MediaPolicy()
    if isinstance(image, Image.Image):
        return _from_pil(image, policy)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _decode(bytes(image), policy)
    if isinstance(image, os.PathLike):
        image = os.fspath(image)
    if not isinstance(image, str):
        raise _fail("invalid_image_url", _MSG_URL)
    return _decode(_read_source(image, policy), policy)


def encode_image_base64(
    image: str | os.PathLike | bytes | Image.Image,
    format: str = "PNG",
    policy: MediaPolicy | None = None,
) -> str:
    """Base64 text (no ``data:`` prefix) of the RGB image saved as ``format``, like LMDeploy's."""
    rgb = load_image(image, policy)
    buffer = io.BytesIO()
    rgb.save(buffer, format=format)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------------- source routing

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _read_source(text: str, policy: MediaPolicy) -> bytes:
    head = text[:8].lower()
    if head.startswith(("http:", "https:")):
        return _fetch_http(text, policy)
    if head.startswith("data:"):
        return _read_data_url(text, policy)
    if head.startswith("file:"):
        return _read_local(_file_url_path(text), policy)
    if _SCHEME.match(text):  # gopher://, ftp://, ...: refused, never treated as a path
        raise _fail("invalid_image_url", _MSG_URL)
    return _read_local(text, policy)


# --------------------------------------------------------------------------------------- data URLs

# Declared MIME type -> the format it names. The declared type must be an allowed one, but decoding
# follows the magic bytes (a PNG labelled image/jpeg is decoded as PNG).
_MIME_FORMATS = {
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "image/jpg": "JPEG",
    "image/pjpeg": "JPEG",
    "image/webp": "WEBP",
    "image/gif": "GIF",
    "image/bmp": "BMP",
    "image/x-bmp": "BMP",
    "image/x-ms-bmp": "BMP",
    "image/tiff": "TIFF",
}


def _read_data_url(text: str, policy: MediaPolicy) -> bytes:
    header, comma, payload = text[5:].partition(",")
    params = header.lower().split(";")
    if not comma or len(params) < 2 or params[-1].strip() != "base64":
        raise _fail("invalid_image_url", _MSG_URL)
    if _MIME_FORMATS.get(params[0].strip()) not in policy.allowed_formats:
        raise _fail("unsupported_image_type", _MSG_TYPE)
    # Bound the work before decoding: 4 base64 characters carry 3 bytes.
    if len(payload) > 4 * -(-policy.max_bytes // 3):
        raise _fail("image_too_large", _MSG_TOO_LARGE)
    try:
        return b64decode_strict(payload)  # lets the GIL go: the engine thread launches meanwhile
    except (binascii.Error, ValueError):
        raise _fail("invalid_image_format", _MSG_FORMAT) from None


# ------------------------------------------------------------------------------------- local files


def _file_url_path(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unbalanced '[' in the authority
        raise _fail("invalid_image_url", _MSG_URL) from None
    if parts.netloc not in ("", "localhost"):  # file://host/... would mean a remote share
        raise _fail("invalid_image_url", _MSG_URL)
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise _fail("invalid_image_url", _MSG_URL)
    return path


def _confine(path: str, root: str) -> str:
    """Resolve ``path`` (relative paths are taken from ``root``) and require it inside ``root``."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, path))
    if os.path.commonpath([real_root, real]) != real_root:
        raise _fail("invalid_image_url", _MSG_LOCAL_DENIED)
    return real


def _read_local(path: str, policy: MediaPolicy) -> bytes:
    if not policy.allow_local_files:
        raise _fail("invalid_image_url", _MSG_LOCAL_DENIED)
    if not path or "\x00" in path:
        raise _fail("invalid_image_url", _MSG_LOCAL_READ)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if policy.local_root is not None:
        path = _confine(path, policy.local_root)
        flags |= getattr(os, "O_NOFOLLOW", 0)  # the last component must not become a symlink
    try:
        # O_NONBLOCK: opening a FIFO must not hang; non-regular files are refused below.
        fd = os.open(path, flags)
    except OSError:
        raise _fail("invalid_image_url", _MSG_LOCAL_READ) from None
    try:
        if policy.local_root is not None:
            _recheck_opened(fd, policy.local_root)
        return _read_fd(fd, policy.max_bytes)
    finally:
        os.close(fd)


def _recheck_opened(fd: int, root: str) -> None:
    """Where the OS can name an open file, check the opened file again: a directory swapped for a
    symlink between the check and the open must not let the read escape the root."""
    link = f"/proc/self/fd/{fd}"
    if os.path.islink(link):
        _confine(os.readlink(link), root)


def _read_fd(fd: int, max_bytes: int) -> bytes:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise _fail("invalid_image_url", _MSG_LOCAL_READ)
    if info.st_size > max_bytes:
        raise _fail("image_too_large", _MSG_TOO_LARGE)
    chunks, total = [], 0
    while total <= max_bytes:  # the file may grow after fstat
        chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    if total > max_bytes:
        raise _fail("image_too_large", _MSG_TOO_LARGE)
    return b"".join(chunks)


# ------------------------------------------------------------------------------------- URL parsing


@dataclass(frozen=True)
class _Target:
    """One parsed http(s) URL: ``host`` is the normalised name (or address text) for Host/SNI."""

    scheme: str
    host: str
    address: IPAddress | None  # set when the URL names an address literally
    port: int
    path: str  # request target: path and query, ASCII


_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")
_NUMERIC_LABEL = re.compile(r"0x[0-9a-f]*|[0-9]+")
_PORT = re.compile(r"[0-9]{1,5}")
# Characters kept as-is in a request target; anything else (non-ASCII) is percent-encoded.
_TARGET_SAFE = "/?#[]@!$&'()*+,;=:-._~%"


def _parse_http_url(url: str) -> _Target:
    # Parser differentials start with characters that parsers treat differently: refuse them all.
    if len(url) > 8192 or any(ord(c) <= 0x20 or c in "\\\x7f" for c in url):
        raise _fail("invalid_image_url", _MSG_URL)
    try:
        parts = urlsplit(url)
    except ValueError:
        raise _fail("invalid_image_url", _MSG_URL) from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.netloc or "@" in parts.netloc:
        raise _fail("invalid_image_url", _MSG_URL)
    host_text, port_text = _split_host_port(parts.netloc)
    host, address = _parse_host(host_text)
    port = int(port_text) if port_text else (443 if scheme == "https" else 80)
    if not 1 <= port <= 65535:
        raise _fail("invalid_image_url", _MSG_URL)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if not path.startswith("/"):
        raise _fail("invalid_image_url", _MSG_URL)
    return _Target(scheme, host, address, port, quote(path, safe=_TARGET_SAFE))


def _split_host_port(netloc: str) -> tuple[str, str]:
    if netloc.startswith("["):
        end = netloc.find("]")
        host, rest = netloc[: end + 1], netloc[end + 1 :]
        if end < 0 or (rest and not rest.startswith(":")):
            raise _fail("invalid_image_url", _MSG_URL)
        port = rest[1:]
    else:
        host, _, port = netloc.partition(":")
    if port and not _PORT.fullmatch(port):  # also refuses a second ':' and signs
        raise _fail("invalid_image_url", _MSG_URL)
    return host, port


def _parse_host(text: str) -> tuple[str, IPAddress | None]:
    """Normalise a URL host: IPv6 literal, IPv4 in any numeric form, or DNS name (IDNA, lower)."""
    if text.startswith("["):
        inner = text[1:-1]
        if "%" in inner:  # zone ids are local by definition
            raise _fail("invalid_image_url", _MSG_URL)
        try:
            address = ipaddress.IPv6Address(inner)
        except ValueError:
            raise _fail("invalid_image_url", _MSG_URL) from None
        return str(address), address
    try:
        # IDNA maps look-alikes (fullwidth digits and dots) onto ASCII: do it before the IP check.
        name = text if text.isascii() else text.encode("idna").decode("ascii")
    except UnicodeError:
        raise _fail("invalid_image_url", _MSG_URL) from None
    name = name.lower()
    name = name[:-1] if name.endswith(".") else name
    labels = name.split(".")
    if not name or len(name) > 253:
        raise _fail("invalid_image_url", _MSG_URL)
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        # A name ending in a number is an IPv4 address to URL parsers and to inet_aton.
        address = _parse_ipv4_numbers(labels)
        return str(address), address
    if not all(_LABEL.fullmatch(label) for label in labels):
        raise _fail("invalid_image_url", _MSG_URL)
    return name, None


def _parse_ipv4_numbers(labels: list[str]) -> ipaddress.IPv4Address:
    """IPv4 in the forms inet_aton accepts: 1-4 parts, each decimal, 0x-hex or 0-octal; the last
    part fills the remaining bytes (``127.1``, ``0x7f000001``, ``2130706433``, ``0177.0.0.1``)."""
    if not 1 <= len(labels) <= 4:
        raise _fail("invalid_image_url", _MSG_URL)
    numbers = [_parse_ipv4_part(label) for label in labels]
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(numbers)):
        raise _fail("invalid_image_url", _MSG_URL)
    value = last
    for i, n in enumerate(head):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def _parse_ipv4_part(label: str) -> int:
    if not _NUMERIC_LABEL.fullmatch(label):  # int() alone would take '+1', ' 1' and '1_0'
        raise _fail("invalid_image_url", _MSG_URL)
    try:
        if label[:2] == "0x":
            return int(label[2:] or "0", 16)
        if len(label) > 1 and label.startswith("0"):
            return int(label[1:], 8)
        return int(label, 10)
    except ValueError:  # 8 or 9 in an octal part
        raise _fail("invalid_image_url", _MSG_URL) from None


# ---------------------------------------------------------------------------------- address policy

_BLOCKED_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in (
        # IPv4: this network, private, carrier-grade NAT, loopback, link-local, IETF protocol
        # assignments, documentation, 6to4 relay, benchmarking, multicast, reserved, broadcast.
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
        "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16",
        "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
        # IPv6: reserved (loopback, unspecified, mapped, compatible), discard, IETF (Teredo incl.),
        # documentation, unique-local, link-local, site-local, multicast.
        "::/8", "100::/64", "2001::/23", "2001:db8::/32", "fc00::/7", "fe80::/10", "fec0::/10",
        "ff00::/8",
    )
)  # fmt: skip
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address can lead to (mapped, 6to4, Teredo client, NAT64)."""
    found = [address.ipv4_mapped, address.sixtofour, address.teredo and address.teredo[1]]
    if any(address in net for net in _NAT64):
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return [a for a in found if a]


def is_public_address(address: IPAddress) -> bool:
    """True for globally routable unicast addresses; False for loopback, private, link-local,
    unspecified, multicast, reserved, CGNAT, documentation, and IPv6 forms embedding such IPv4."""
    if any(address in net for net in _BLOCKED_NETWORKS if net.version == address.version):
        return False
    flags = (
        address.is_private, address.is_loopback, address.is_link_local, address.is_multicast,
        address.is_reserved, address.is_unspecified,
    )  # fmt: skip
    if any(flags) or not address.is_global:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        return all(is_public_address(v4) for v4 in _embedded_ipv4(address))
    return True


def _check_host_allowed(target: _Target, policy: MediaPolicy) -> None:
    domains = policy.allowed_domains
    if domains is not None and not any(
        target.host == d or (target.address is None and target.host.endswith("." + d))
        for d in domains
    ):
        raise _fail("invalid_image_url", _MSG_URL)


def _checked_addresses(target: _Target, policy: MediaPolicy, deadline: float) -> list[str]:
    """Resolve once and check every address: one forbidden address refuses the whole host."""
    if target.address is not None:
        addresses = [target.address]
    else:
        resolver = policy.resolver or _system_resolve
        texts = _call_before(deadline, resolver, target.host, target.port)
        try:
            addresses = list(dict.fromkeys(ipaddress.ip_address(t) for t in texts))
        except (TypeError, ValueError):  # e.g. scoped link-local 'fe80::1%eth0'
            raise _fail("invalid_image_url", _MSG_URL) from None
    if not addresses:
        raise _fail("invalid_image_url", _MSG_FETCH)
    if not policy.allow_private_networks and not all(map(is_public_address, addresses)):
        raise _fail("invalid_image_url", _MSG_URL)
    return [str(a) for a in addresses]


def _system_resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


def _call_before(deadline: float, fn: Callable, *args):
    """Run ``fn(*args)`` but give up at ``deadline`` (DNS lookups have no timeout argument)."""
    result: list = []

    def run() -> None:
        try:
            result.append((True, fn(*args)))
        except Exception as exc:  # surfaced below as a fetch failure
            result.append((False, exc))

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(_remaining(deadline))
    if not result:
        raise _fail("image_fetch_timeout", _MSG_TIMEOUT)
    ok, value = result[0]
    if not ok:
        raise _fail("invalid_image_url", _MSG_FETCH)
    return value


# -------------------------------------------------------------------------------------- HTTP fetch


class _FetchTimeout(TimeoutError):
    pass


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _FetchTimeout()
    return left


def _open_socket(ip: str, port: int, timeout: float) -> socket.socket:
    """TCP connection to an already checked address (tests substitute this to reroute)."""
    return socket.create_connection((ip, port), timeout=timeout)


@functools.lru_cache(maxsize=1)
def _default_tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()  # verifies chains and hostnames, TLS >= 1.2


def _tls_context() -> ssl.SSLContext:
    return _default_tls_context()


class _DeadlineReader(io.RawIOBase):
    """Socket reads that each wait at most until the fetch deadline: a server trickling one byte at
    a time cannot stretch the fetch, whether in the headers or the body."""

    def __init__(self, raw: io.RawIOBase, sock: socket.socket, deadline: float):
        # `raw` is the socket's own file object: it keeps the socket open after the connection
        # object lets go of it (http.client does that when the server will close).
        self._raw, self._sock, self._deadline = raw, sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        self._sock.settimeout(_remaining(self._deadline))
        return self._raw.readinto(buffer)

    def close(self) -> None:
        self._raw.close()
        super().close()


class _DeadlineResponse(http.client.HTTPResponse):
    def __init__(self, sock: socket.socket, *args, deadline: float, **kwargs):
        super().__init__(sock, *args, **kwargs)
        self.fp = io.BufferedReader(_DeadlineReader(self.fp.detach(), sock, deadline))


class _PinnedConnection(http.client.HTTPConnection):
    """HTTP(S) to the URL's host name, but over a socket to the checked addresses only."""

    def __init__(self, target: _Target, addresses: list[str], deadline: float):
        super().__init__(target.host, target.port)
        if target.scheme == "https":
            self.default_port = 443  # Host header without ':443'
        self._target, self._addresses, self._deadline = target, addresses, deadline
        self.response_class = functools.partial(_DeadlineResponse, deadline=deadline)

    def connect(self) -> None:
        sock = self._connect_any()
        if self._target.scheme == "https":
            sock.settimeout(_remaining(self._deadline))  # the handshake as a whole gets this
            sock = _tls_context().wrap_socket(sock, server_hostname=self._target.host)
        self.sock = sock

    def _connect_any(self) -> socket.socket:
        error: OSError = OSError()
        for ip in self._addresses:
            try:
                return _open_socket(ip, self._target.port, _remaining(self._deadline))
            except _FetchTimeout:
                raise
            except OSError as exc:
                error = exc
        raise error


_REDIRECTS = (301, 302, 303, 307, 308)


def _fetch_http(url: str, policy: MediaPolicy) -> bytes:
    deadline = time.monotonic() + policy.timeout_s
    try:
        for _ in range(policy.max_redirects + 1):
            target = _parse_http_url(url)
            _check_host_allowed(target, policy)
            addresses = _checked_addresses(target, policy, deadline)
            body, location = _request(target, addresses, policy, deadline)
            if location is None:
                return body
            url = urljoin(url, location)  # the next hop is parsed and checked from scratch
    except ImageError:
        raise
    except TimeoutError:
        raise _fail("image_fetch_timeout", _MSG_TIMEOUT) from None
    except (OSError, http.client.HTTPException, ValueError):
        raise _fail("invalid_image_url", _MSG_FETCH) from None
    raise _fail("invalid_image_url", _MSG_URL)  # too many redirects


def _request(
    target: _Target, addresses: list[str], policy: MediaPolicy, deadline: float
) -> tuple[bytes, str | None]:
    """One GET. Returns (body, None), or (b"", location) for a redirect."""
    conn = _PinnedConnection(target, addresses, deadline)
    try:
        conn.putrequest("GET", target.path)  # also sends Host and 'Accept-Encoding: identity'
        conn.putheader("User-Agent", "vlmdeploy")
        conn.putheader("Accept", "image/*")
        conn.putheader("Connection", "close")
        conn.endheaders()
        response = conn.getresponse()
        if response.status in _REDIRECTS:
            location = response.getheader("Location")
            if not location:
                raise _fail("invalid_image_url", _MSG_FETCH)
            return b"", location
        _check_response(response, policy)
        return _read_capped(response, policy.max_bytes), None
    finally:
        conn.close()


def _check_response(response: http.client.HTTPResponse, policy: MediaPolicy) -> None:
    if not 200 <= response.status < 300:
        raise _fail("invalid_image_url", _MSG_FETCH)
    encoding = (response.getheader("Content-Encoding") or "identity").strip().lower()
    transfer = (response.getheader("Transfer-Encoding") or "").strip().lower()
    if encoding != "identity" or transfer not in ("", "chunked"):  # no decompression (bombs)
        raise _fail("invalid_image_url", _MSG_FETCH)
    ctype = (response.getheader("Content-Type") or "").split(";")[0].strip().lower()
    if ctype and not ctype.startswith("image/") and ctype not in _OPAQUE_TYPES:
        raise _fail("invalid_image_url", _MSG_FETCH)  # e.g. an HTML error page
    length = response.getheader("Content-Length") or ""
    if length.isdigit() and int(length) > policy.max_bytes:
        raise _fail("image_too_large", _MSG_TOO_LARGE)


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
        raise _fail("image_too_large", _MSG_TOO_LARGE)
    if response.length:  # the server closed before sending all it announced
        raise _fail("invalid_image_url", _MSG_FETCH)
    return b"".join(chunks)


# ---------------------------------------------------------------------------------------- decoding

# (magic prefix, format); WEBP is 'RIFF' + 4 size bytes + 'WEBP', checked separately.
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"%PDF", "PDF"),
    (b"8BPS", "PSD"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"<?xml", "SVG"),
    (b"<svg", "SVG"),
)


def sniff_format(data: bytes) -> str | None:
    """The image format named by the leading bytes, or None if unrecognised."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[4:8] == b"ftyp":  # ISO media: HEIC, AVIF, ...
        return "HEIF"
    return next((fmt for magic, fmt in _MAGIC if data.startswith(magic)), None)


def _decode(data: bytes, policy: MediaPolicy) -> Image.Image:
    if len(data) > policy.max_bytes:
        raise _fail("image_too_large", _MSG_TOO_LARGE)
    fmt = sniff_format(data)
    if fmt is None:
        raise _fail("invalid_image_format", _MSG_FORMAT)
    if fmt not in policy.allowed_formats:
        raise _fail("unsupported_image_type", _MSG_TYPE)
    try:
        # Only the sniffed format's decoder may run; open() reads the header, not the pixels.
        image = Image.open(io.BytesIO(data), formats=[fmt])
        _check_pixels(image, policy)
        image.load()
        return _to_rgb(image, fresh=True)
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise _fail("image_too_large", _MSG_TOO_LARGE) from None
    except Exception:  # PIL raises many types (OSError, SyntaxError, struct.error, ...)
        raise _fail("invalid_image_format", _MSG_FORMAT) from None


def _check_pixels(image: Image.Image, policy: MediaPolicy) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise _fail("invalid_image_format", _MSG_FORMAT)
    if width * height > policy.max_pixels:
        raise _fail("image_too_large", _MSG_TOO_LARGE)


def _from_pil(image: Image.Image, policy: MediaPolicy) -> Image.Image:
    _check_pixels(image, policy)
    try:
        return _to_rgb(image)
    except Exception:  # a lazily opened image whose data is broken
        raise _fail("invalid_image_format", _MSG_FORMAT) from None


_MODES_16BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def _to_rgb(image: Image.Image, fresh: bool = False) -> Image.Image:
    """A new RGB image (never the caller's object). See the module docstring for the choices.
    ``fresh``: ``image`` was just decoded here, so an RGB one is returned as it is (a copy of a
    1024 x 1024 image costs about 2.4 ms)."""
    if fresh and image.mode == "RGB":
        return image
    if image.mode in _MODES_16BIT:
        # Scale, don't clip: the high byte is the 8-bit value (as PIL reads 16-bit RGB PNGs).
        high = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)  # (H, W)
        image = Image.fromarray(high)
    return image.convert("RGB")
