"""Which http(s) URLs an image may be fetched from: the checks against server-side request
forgery, made on every hop before any connection.

* Strict URL parsing: no userinfo, no backslashes, no control characters or spaces (the characters
  that parsers treat differently), ports in range; numeric IPv4 forms such as ``0x7f000001``,
  ``2130706433`` and ``127.1`` are recognised as the addresses they are, as ``inet_aton`` and URL
  parsers read them, and IDNA look-alikes are mapped before that check.
* ``allowed_domains``: the host must be one of them or a subdomain (an address literal matches
  only exactly).
* One DNS resolution per hop, within the fetch's deadline; every resolved address is checked and
  one forbidden address refuses the host. Without ``allow_private_networks`` only globally
  routable unicast addresses pass: no loopback, private, link-local, CGNAT, documentation,
  multicast or reserved ranges, and no IPv6 form that leads to such an IPv4 address (mapped,
  6to4, Teredo, NAT64). :mod:`vlmdeploy.vl.fetch` then connects to these checked addresses only.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from vlmdeploy.vl.media_policy import MSG_FETCH, MSG_TIMEOUT, MSG_URL, MediaPolicy, fail

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# ------------------------------------------------------------------------------------- URL parsing


@dataclass(frozen=True)
class Target:
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


def parse_http_url(url: str) -> Target:
    # Parser differentials start with characters that parsers treat differently: refuse them all.
    if len(url) > 8192 or any(ord(c) <= 0x20 or c in "\\\x7f" for c in url):
        raise fail("invalid_image_url", MSG_URL)
    try:
        parts = urlsplit(url)
    except ValueError:
        raise fail("invalid_image_url", MSG_URL) from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.netloc or "@" in parts.netloc:
        raise fail("invalid_image_url", MSG_URL)
    host_text, port_text = _split_host_port(parts.netloc)
    host, address = _parse_host(host_text)
    port = int(port_text) if port_text else (443 if scheme == "https" else 80)
    if not 1 <= port <= 65535:
        raise fail("invalid_image_url", MSG_URL)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if not path.startswith("/"):
        raise fail("invalid_image_url", MSG_URL)
    return Target(scheme, host, address, port, quote(path, safe=_TARGET_SAFE))


def _split_host_port(netloc: str) -> tuple[str, str]:
    if netloc.startswith("["):
        end = netloc.find("]")
        host, rest = netloc[: end + 1], netloc[end + 1 :]
        if end < 0 or (rest and not rest.startswith(":")):
            raise fail("invalid_image_url", MSG_URL)
        port = rest[1:]
    else:
        host, _, port = netloc.partition(":")
    if port and not _PORT.fullmatch(port):  # also refuses a second ':' and signs
        raise fail("invalid_image_url", MSG_URL)
    return host, port


def _parse_host(text: str) -> tuple[str, IPAddress | None]:
    """Normalise a URL host: IPv6 literal, IPv4 in any numeric form, or DNS name (IDNA, lower)."""
    if text.startswith("["):
        inner = text[1:-1]
        if "%" in inner:  # zone ids are local by definition
            raise fail("invalid_image_url", MSG_URL)
        try:
            address = ipaddress.IPv6Address(inner)
        except ValueError:
            raise fail("invalid_image_url", MSG_URL) from None
        return str(address), address
    try:
        # IDNA maps look-alikes (fullwidth digits and dots) onto ASCII: do it before the IP check.
        name = text if text.isascii() else text.encode("idna").decode("ascii")
    except UnicodeError:
        raise fail("invalid_image_url", MSG_URL) from None
    name = name.lower()
    name = name[:-1] if name.endswith(".") else name
    labels = name.split(".")
    if not name or len(name) > 253:
        raise fail("invalid_image_url", MSG_URL)
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        # A name ending in a number is an IPv4 address to URL parsers and to inet_aton.
        address = _parse_ipv4_numbers(labels)
        return str(address), address
    if not all(_LABEL.fullmatch(label) for label in labels):
        raise fail("invalid_image_url", MSG_URL)
    return name, None


def _parse_ipv4_numbers(labels: list[str]) -> ipaddress.IPv4Address:
    """IPv4 in the forms inet_aton accepts: 1-4 parts, each decimal, 0x-hex or 0-octal; the last
    part fills the remaining bytes (``127.1``, ``0x7f000001``, ``2130706433``, ``0177.0.0.1``)."""
    if not 1 <= len(labels) <= 4:
        raise fail("invalid_image_url", MSG_URL)
    numbers = [_parse_ipv4_part(label) for label in labels]
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(numbers)):
        raise fail("invalid_image_url", MSG_URL)
    value = last
    for i, n in enumerate(head):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def _parse_ipv4_part(label: str) -> int:
    if not _NUMERIC_LABEL.fullmatch(label):  # int() alone would take '+1', ' 1' and '1_0'
        raise fail("invalid_image_url", MSG_URL)
    try:
        if label[:2] == "0x":
            return int(label[2:] or "0", 16)
        if len(label) > 1 and label.startswith("0"):
            return int(label[1:], 8)
        return int(label, 10)
    except ValueError:  # 8 or 9 in an octal part
        raise fail("invalid_image_url", MSG_URL) from None


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


def check_host_allowed(target: Target, policy: MediaPolicy) -> None:
    domains = policy.allowed_domains
    if domains is not None and not any(
        target.host == d or (target.address is None and target.host.endswith("." + d))
        for d in domains
    ):
        raise fail("invalid_image_url", MSG_URL, "the host is not an allowed media domain")


def checked_addresses(target: Target, policy: MediaPolicy, deadline: float) -> list[str]:
    """Resolve once and check every address: one forbidden address refuses the whole host."""
    if target.address is not None:
        addresses = [target.address]
    else:
        resolver = policy.resolver or _system_resolve
        texts = _call_before(deadline, resolver, target.host, target.port)
        try:
            addresses = list(dict.fromkeys(ipaddress.ip_address(t) for t in texts))
        except (TypeError, ValueError):  # e.g. scoped link-local 'fe80::1%eth0'
            raise fail("invalid_image_url", MSG_URL) from None
    if not addresses:
        raise fail("invalid_image_url", MSG_FETCH, "the host name could not be resolved")
    if not policy.allow_private_networks and not all(map(is_public_address, addresses)):
        raise fail("invalid_image_url", MSG_URL,
                   "the host is a private, loopback or reserved address")
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
    worker.join(remaining(deadline))
    if not result:
        raise fail("image_fetch_timeout", MSG_TIMEOUT)
    ok, value = result[0]
    if not ok:
        raise fail("invalid_image_url", MSG_FETCH, "the host name could not be resolved")
    return value


# ------------------------------------------------------------------------------------ deadline


class FetchTimeout(TimeoutError):
    """The fetch's deadline passed (one deadline covers every step of a fetch)."""


def remaining(deadline: float) -> float:
    """Seconds left before ``deadline`` (a ``time.monotonic`` value); none left raises."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchTimeout()
    return left
