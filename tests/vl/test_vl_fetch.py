"""load_image over HTTP(S): SSRF refusals that make no connection (checked with a real listener),
parser differentials, per-hop redirect checks, DNS pinning, and hostile servers (RELIABILITY
§3.3 rows I11-I16). Everything stays on 127.0.0.1; "public" names resolve through an injected
resolver and their connections are rerouted to the local server."""

from __future__ import annotations

import socket
import ssl
import time
from urllib.parse import quote

import numpy as np
import pytest

from vlmdeploy.errors import ImageError
from vlmdeploy.vl import MediaPolicy, fetch, load_image, media_policy, ssrf

PUBLIC_IP = "93.184.216.34"  # a globally routable address; never actually dialled here


def fake_dns(table: dict[str, list[str]]):
    calls: list[str] = []

    def resolve(host: str, port: int) -> list[str]:
        calls.append(host)
        if host not in table:
            raise socket.gaierror("no such name")
        return table[host]

    resolve.calls = calls  # type: ignore[attr-defined]
    return resolve


def refused(url: str, policy: MediaPolicy, code: str = "invalid_image_url") -> ImageError:
    with pytest.raises(ImageError) as info:
        load_image(url, policy)
    assert info.value.code == code, (url, info.value.code)
    assert url not in info.value.message
    return info.value


@pytest.fixture
def dialled(monkeypatch):
    """Records every (ip, port) the fetcher connects to and reroutes PUBLIC_IP to 127.0.0.1
    at ``reroute[0]`` (a test sets it to its server's port)."""
    log: list[tuple[str, int]] = []
    reroute = [0]
    real = fetch._open_socket

    def open_socket(ip: str, port: int, timeout: float) -> socket.socket:
        log.append((ip, port))
        if ip == PUBLIC_IP:
            return real("127.0.0.1", reroute[0], timeout)
        return real(ip, port, timeout)

    monkeypatch.setattr(fetch, "_open_socket", open_socket)
    return log, reroute


# ------------------------------------------------------------------------------------ I11: SSRF


SSRF_URLS = [
    "http://127.0.0.1:{port}/",
    "http://0x7f000001:{port}/",
    "http://2130706433:{port}/",
    "http://0177.0.0.1:{port}/",
    "http://127.1:{port}/",
    "http://0x7f.1:{port}/",
    "http://127.0.0.1.:{port}/",
    "http://\uff11\uff12\uff17.0.0.1:{port}/",  # fullwidth digits, IDNA-mapped to 127.0.0.1
    "http://[::1]:{port}/",
    "http://[::ffff:127.0.0.1]:{port}/",
    "http://[::ffff:7f00:1]:{port}/",
    "http://[::127.0.0.1]:{port}/",
    "http://[2002:7f00:1::]:{port}/",  # 6to4 of 127.0.0.1
    "http://[64:ff9b::7f00:1]:{port}/",  # NAT64 of 127.0.0.1
    "http://localhost:{port}/",
    "http://localtest.me:{port}/",  # public DNS name that resolves to 127.0.0.1
    "http://public-and-private.test:{port}/",  # one bad address among good ones
    "HTTP://LOCALHOST:{port}/",
    "http://0:{port}/",
    "http://169.254.169.254/latest/meta-data/",
    "http://10.0.0.1/",
    "http://172.16.0.1/",
    "http://192.168.1.1/",
    "http://100.64.0.1/",  # carrier-grade NAT
    "http://0.0.0.0/",
    "http://224.0.0.1/",
    "http://255.255.255.255/",
    "http://240.0.0.1/",
    "http://[fd00:ec2::254]/",
    "http://[fe80::1]/",
    "http://[ff02::1]/",
    "http://[::]/",
]


@pytest.mark.parametrize("template", SSRF_URLS)
def test_private_targets_make_no_connection(template, listener, dialled):
    log, _ = dialled
    dns = fake_dns({
        "localhost": ["127.0.0.1", "::1"],
        "localtest.me": ["127.0.0.1"],
        "public-and-private.test": [PUBLIC_IP, "127.0.0.1"],
    })  # fmt: skip
    err = refused(template.format(port=listener.port), MediaPolicy(resolver=dns, timeout_s=2))
    # the same refusal for every spelling, saying why (never which address)
    assert err.message == media_policy.MSG_URL.rstrip(".") + \
        ": the host is a private, loopback or reserved address."
    assert log == [] and listener.connections() == 0


def test_system_resolver_localhost_refused(listener, dialled):
    log, _ = dialled
    refused(f"http://localhost:{listener.port}/", MediaPolicy.server_default(timeout_s=2))
    assert log == [] and listener.connections() == 0


def test_address_literals_skip_dns(listener):
    dns = fake_dns({})
    refused(f"http://0x7f000001:{listener.port}/", MediaPolicy(resolver=dns))
    assert dns.calls == []


def test_unresolvable_name():
    refused("http://nowhere.test/", MediaPolicy(resolver=fake_dns({})))


# --------------------------------------------------------------------- I13: parser differentials


DIFFERENTIALS = [
    "http://allowed.com\\@127.0.0.1:{port}/",
    "http://allowed.com@127.0.0.1:{port}/",
    "http://user:pw@allowed.com@127.0.0.1:{port}/",
    "http://127.0.0.1:{port}\\@allowed.com/",
    "http://127.0.0.1:{port}@allowed.com/",
    "http:/\\127.0.0.1:{port}/",
    "http:\\\\127.0.0.1:{port}/",
    "http:127.0.0.1:{port}/",
    "http:///127.0.0.1:{port}/",
    "http://127.0.0.1:{port} /",
    "http://127.0.0.1:{port}\t/",
    "http://127.0.0.1:{port}\n/",
    "http://%31%32%37.0.0.1:{port}/",
    "http://127.0.0.1:+{port}/",
    "http://127.0.0.1:{port}:80/",
    "http://[::1%25lo]:{port}/",
    "http://[::1:{port}/",
    "http://allowed.com:99999/",
    "http://allowed.com:0/",
    "http://allowed..com/",
    "http://-allowed.com/",
    "http://256.0.0.1/",
    "http://1.2.3.4.5/",
    "http://08.0.0.1/",
    "http:///",
    "http://",
]


@pytest.mark.parametrize("template", DIFFERENTIALS)
def test_parser_differentials_refused(template, listener, dialled):
    # Private networks allowed, so only the domain allowlist and the parser stand in the way: a
    # differential that smuggled 127.0.0.1 past them would reach the listener.
    log, _ = dialled
    dns = fake_dns({"allowed.com": ["127.0.0.1"]})
    policy = MediaPolicy(
        allow_private_networks=True, allowed_domains=("allowed.com",), resolver=dns
    )
    refused(template.format(port=listener.port), policy)
    assert log == [] and listener.connections() == 0


@pytest.mark.parametrize(
    "url,host,port",
    [
        ("http://0x7f000001/", "127.0.0.1", 80),
        ("http://2130706433/", "127.0.0.1", 80),
        ("http://0177.0.0.1/", "127.0.0.1", 80),
        ("http://127.1/", "127.0.0.1", 80),
        ("http://10.1.65535/", "10.1.255.255", 80),
        ("http://0x0a.0.0.0x1/", "10.0.0.1", 80),
        ("http://0x/", "0.0.0.0", 80),
        ("https://Example.COM./a", "example.com", 443),
        ("http://b\u00fccher.de:8080/", "xn--bcher-kva.de", 8080),
        ("http://[0:0:0:0:0:ffff:7f00:1]/", "::ffff:7f00:1", 80),
        ("http://img.example.com:/x", "img.example.com", 80),
    ],
)
def test_url_host_normalisation(url, host, port):
    target = ssrf.parse_http_url(url)
    assert (target.host, target.port) == (host, port)


@pytest.mark.parametrize(
    "url",
    ["http://+127.0.0.1/", "http://1_0.0.0.1/", "http://127.0.0.-1/", "http://0x1g.0.0.1/",
     "http://1.2.3.0x100/", "http://4294967296/", "http://1..2/", "http://a b/", "http://a_b-.c/",
     "http://" + "a" * 64 + ".com/", "http://x/" + "a" * 9000],
)  # fmt: skip
def test_url_parser_rejects(url):
    with pytest.raises(ImageError):
        ssrf.parse_http_url(url)


def test_fragment_does_not_move_the_host(listener, dialled):
    log, _ = dialled
    refused(f"http://127.0.0.1:{listener.port}#@allowed.com/", MediaPolicy())
    assert log == [] and listener.connections() == 0


def test_allowed_domains(http_server, dialled):
    log, reroute = dialled
    reroute[0] = http_server.server_address[1]
    dns = fake_dns({n: [PUBLIC_IP] for n in ["img.example.com", "example.com", "badexample.com",
                                              "example.com.evil.org"]})  # fmt: skip
    policy = MediaPolicy(allowed_domains=("example.com",), resolver=dns)
    assert load_image("http://img.example.com/img.png", policy).size == (8, 6)
    assert load_image("http://EXAMPLE.com./img.png", policy).size == (8, 6)
    for url in ["http://badexample.com/img.png", "http://example.com.evil.org/img.png",
                f"http://{PUBLIC_IP}/img.png"]:  # fmt: skip
        refused(url, policy)
    assert len(log) == 2 and dns.calls == ["img.example.com", "example.com"]


# ------------------------------------------------------------------------------ successful fetch


def test_fetch_from_local_server(http_server, sample):
    image, _ = sample
    port = http_server.server_address[1]
    policy = MediaPolicy(allow_private_networks=True, timeout_s=2)
    for path in ["/img.png", "/octet", "/redirect/3", "/relative"]:
        out = load_image(f"http://127.0.0.1:{port}{path}", policy)
        assert np.array_equal(np.asarray(out), np.asarray(image)), path
    assert ("/img.png", f"127.0.0.1:{port}") in http_server.log


# ------------------------------------------------------------------------------- I12: redirects


def test_redirect_limit(http_server):
    port = http_server.server_address[1]
    policy = MediaPolicy(allow_private_networks=True, timeout_s=2, max_redirects=3)
    refused(f"http://127.0.0.1:{port}/redirect/4", policy)
    paths = [p for p, _ in http_server.log]
    assert paths == ["/redirect/4", "/redirect/3", "/redirect/2", "/redirect/1"]  # no 5th request
    refused(f"http://127.0.0.1:{port}/redirect/1", MediaPolicy(allow_private_networks=True,
                                                               max_redirects=0))  # fmt: skip


@pytest.mark.parametrize(
    "location",
    ["file:///etc/passwd", "gopher://127.0.0.1:{listen}/_x", "ftp://127.0.0.1:{listen}/",
     "data:image/png;base64,iVBORw0KGgo=", "http://127.0.0.1:{listen}\\@x/", "//[::1]:{listen}/",
     "dict://127.0.0.1:{listen}/"],
)  # fmt: skip
def test_redirect_to_other_schemes_refused(location, http_server, listener):
    port = http_server.server_address[1]
    target = quote(location.format(listen=listener.port), safe="")
    policy = MediaPolicy(allow_private_networks=True, timeout_s=2)
    refused(f"http://127.0.0.1:{port}/to?u={target}", policy)
    assert listener.connections() == 0


def test_public_redirect_to_private_refused(http_server, listener, dialled):
    # The first hop is a public name (allowed); it redirects to loopback, directly or via a name.
    log, reroute = dialled
    reroute[0] = http_server.server_address[1]
    dns = fake_dns({"cdn.example.com": [PUBLIC_IP], "rebind.example.com": ["127.0.0.1"]})
    policy = MediaPolicy(resolver=dns, timeout_s=2)
    assert load_image("http://cdn.example.com/img.png", policy).size == (8, 6)
    for target in [f"http://127.0.0.1:{listener.port}/x", f"http://rebind.example.com:{listener.port}/",
                   f"http://[::ffff:127.0.0.1]:{listener.port}/"]:  # fmt: skip
        refused(f"http://cdn.example.com/to?u={quote(target, safe='')}", policy)
    assert {ip for ip, _ in log} == {PUBLIC_IP}
    assert listener.connections() == 0


def test_dns_pinning_defeats_rebinding(http_server, dialled):
    # I14: the name answers public first and loopback afterwards. One lookup per hop, and the
    # connection goes to the address that was checked, with the name in the Host header.
    log, reroute = dialled
    reroute[0] = http_server.server_address[1]
    answers = iter([[PUBLIC_IP], [PUBLIC_IP], ["127.0.0.1"]])
    calls = []

    def rebinding(host: str, port: int) -> list[str]:
        calls.append(host)
        return next(answers)

    policy = MediaPolicy(resolver=rebinding, timeout_s=2)
    assert load_image("http://cdn.example.com/img.png", policy).size == (8, 6)
    assert calls == ["cdn.example.com"] and log == [(PUBLIC_IP, 80)]
    assert http_server.log[-1] == ("/img.png", "cdn.example.com")
    # A redirect back to the same name is a new hop: resolved again, now private, refused.
    refused("http://cdn.example.com/redirect/1", policy)
    assert log == [(PUBLIC_IP, 80)] * 2 and len(calls) == 3


# ------------------------------------------------------------------------- I15, I16: bad servers


def test_error_statuses_and_html(http_server):
    port = http_server.server_address[1]
    policy = MediaPolicy(allow_private_networks=True, timeout_s=2)
    reasons = {"/missing": "the server answered HTTP 404",
               "/html": "the answer is text/html, not an image",
               "/no-location": "a redirect without a Location"}
    for path in ["/missing", "/error", "/html", "/no-location"]:
        err = refused(f"http://127.0.0.1:{port}{path}", policy)
        assert err.message.startswith("The image could not be fetched from its URL: ")
        if path in reasons:  # the 400 says why (issue 23)
            assert err.message.endswith(reasons[path] + "."), err.message
    # Declared image/png but the body is HTML: decided by the bytes.
    refused(f"http://127.0.0.1:{port}/fake-png", policy, "invalid_image_format")


@pytest.mark.parametrize("path", ["/trickle-body", "/trickle-headers", "/short-then-stall"])
def test_deadline_covers_the_whole_fetch(http_server, path):
    # Each byte arrives well within any per-read timeout; only a whole-fetch deadline stops it.
    port = http_server.server_address[1]
    policy = MediaPolicy(allow_private_networks=True, timeout_s=0.25)
    start = time.monotonic()
    refused(f"http://127.0.0.1:{port}{path}", policy, "image_fetch_timeout")
    assert time.monotonic() - start < 0.6


def test_read_is_capped(http_server):
    port = http_server.server_address[1]
    policy = MediaPolicy(allow_private_networks=True, timeout_s=5, max_bytes=200_000)
    start = time.monotonic()
    refused(f"http://127.0.0.1:{port}/endless", policy, "image_too_large")
    refused(f"http://127.0.0.1:{port}/huge-length", policy, "image_too_large")
    assert time.monotonic() - start < 2


def test_lying_content_length(http_server):
    port = http_server.server_address[1]
    policy = MediaPolicy(allow_private_networks=True, timeout_s=2)
    refused(f"http://127.0.0.1:{port}/short-then-close", policy)  # body shorter than promised
    refused(f"http://127.0.0.1:{port}/understated", policy, "invalid_image_format")


def test_content_encoding_refused(http_server):
    port = http_server.server_address[1]
    refused(f"http://127.0.0.1:{port}/gzip", MediaPolicy(allow_private_networks=True, timeout_s=2))


def test_connection_refused_is_a_fetch_error(listener):
    port = listener.port
    listener.sock.close()
    err = refused(f"http://127.0.0.1:{port}/", MediaPolicy(allow_private_networks=True))
    assert err.message == media_policy.MSG_FETCH.rstrip(".") + ": the connection was refused."


# ------------------------------------------------------------------------------------------ TLS


def test_https_pins_address_and_verifies_the_name(tls_server, dialled, monkeypatch):
    server, cert, names = tls_server
    log, reroute = dialled
    reroute[0] = server.server_address[1]
    client_ctx = ssl.create_default_context(cafile=str(cert))
    monkeypatch.setattr(fetch, "_tls_context", lambda: client_ctx)
    dns = fake_dns({"img.example.com": [PUBLIC_IP], "other.example.com": [PUBLIC_IP]})
    policy = MediaPolicy(resolver=dns, timeout_s=3)
    assert load_image("https://img.example.com/img.png", policy).size == (8, 6)
    assert names == ["img.example.com"] and log == [(PUBLIC_IP, 443)]
    assert server.log[-1] == ("/img.png", "img.example.com")
    # Same address, other name: the certificate does not match the URL's host.
    refused("https://other.example.com/img.png", policy)
    assert names[-1] == "other.example.com"
