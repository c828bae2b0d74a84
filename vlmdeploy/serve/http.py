"""uvicorn's h11 protocol with bounds on connections and on request headers.

* **Header deadline.** uvicorn closes idle keep-alive connections but puts no limit on how long a
  client may take to send a request's headers: a client that trickles one byte a second holds a
  connection forever. A timer is armed whenever the connection waits for a new request, and the
  connection is closed if the headers have not all arrived when it fires.
* **Header size and count.** The header block is capped at `MAX_HEADER_BYTES` and
  `MAX_HEADER_LINES` lines (431 beyond): h11 enforces its own size cap only on headers that arrive
  in pieces, so a block read in one go is counted here.
* **Connections.** At most `max_connections` connections are open at once (503 beyond) and at
  most `max_per_client` from one client address (429 beyond); an extra connection is answered at
  once and closed, before it can send anything. These caps count connections, not requests:
  a request takes one of the server's `max_concurrent_requests` slots only once its body has been
  read (`vlmdeploy.serve.jobs`), so connections that send headers and nothing more never make
  real requests get 429. (uvicorn's `limit_concurrency` would answer a plain-text 503 to every
  request while such connections are open.)
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

MAX_HEADER_BYTES = 64 * 1024
MAX_HEADER_LINES = 128  # the request line included


def _raw_response(status: int, reason: str, message: str, code: str,
                  error_type: str = "invalid_request_error",
                  headers: tuple[bytes, ...] = ()) -> bytes:
    """A complete HTTP/1.1 response in OpenAI's envelope that closes the connection."""
    body = json.dumps({"error": {"message": message, "type": error_type, "param": None,
                                 "code": code}}).encode()
    head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\nconnection: close\r\n" % (
        status, reason.encode())
    return head + b"".join(h + b"\r\n" for h in headers) + b"content-length: %d\r\n\r\n%s" % (
        len(body), body)


_TOO_LARGE = _raw_response(431, "Request Header Fields Too Large",
                           "Request headers are too large.", "request_header_fields_too_large")
_TOO_MANY_FROM_CLIENT = _raw_response(
    429, "Too Many Requests", "Too many connections from this address; retry shortly.",
    "too_many_connections", "rate_limit_error", (b"retry-after: 1",))
_TOO_MANY = _raw_response(
    503, "Service Unavailable", "The server has too many open connections; retry shortly.",
    "too_many_connections", "service_unavailable_error", (b"retry-after: 1",))


class _BoundedProtocol(H11Protocol):
    header_timeout_s: float = 10.0
    max_header_bytes: int = MAX_HEADER_BYTES
    max_connections: int = 0  # 0: no cap
    max_per_client: int = 0  # 0: no cap
    per_client: Counter[str]  # open connections by client address, shared by one server's

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_bytes = self._header_lines = 0
        self._peer = self.client[0] if self.client else None
        refusal = self._over_capacity()
        if refusal is not None:
            self._peer = None  # not counted
            transport.write(refusal)
            transport.close()
            return
        if self._peer is not None:
            self.per_client[self._peer] += 1
        self._arm_header_timer()

    def _over_capacity(self) -> bytes | None:
        if self.max_connections and len(self.connections) > self.max_connections:
            return _TOO_MANY
        if self.max_per_client and self._peer is not None and \
                self.per_client[self._peer] >= self.max_per_client:
            return _TOO_MANY_FROM_CLIENT
        return None

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        self._arm_header_timer()
        if self._waiting_for_request() and not self._headers_within_bounds(data):
            self.transport.write(_TOO_LARGE)
            self.transport.close()
            return
        super().data_received(data)

    def _headers_within_bounds(self, data: bytes) -> bool:
        """Count the header block's bytes and lines as they arrive (h11 bounds only pieces)."""
        end = data.find(b"\r\n\r\n")
        part = len(data) if end < 0 else end
        size = self._header_bytes + part
        lines = self._header_lines + data.count(b"\r\n", 0, part)
        if size > self.max_header_bytes or lines > MAX_HEADER_LINES:
            return False
        self._header_bytes, self._header_lines = (0, 0) if end >= 0 else (size, lines)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        if self._peer is not None:
            self.per_client[self._peer] -= 1
            if self.per_client[self._peer] <= 0:
                del self.per_client[self._peer]
            self._peer = None
        super().connection_lost(exc)

    def _waiting_for_request(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm_header_timer(self) -> None:
        if self._header_timer is None and self._waiting_for_request():
            self._header_timer = self.loop.call_later(self.header_timeout_s,
                                                      self._on_header_timeout)

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self._waiting_for_request() and not self.transport.is_closing():
            self.transport.close()


def header_deadline_protocol(timeout_s: float, max_connections: int = 0,
                             max_per_client: int = 0) -> type[Any]:
    """An h11 protocol class for `uvicorn.Config(http=...)`: the header deadline and caps, and a
    per-client connection count of its own (one class per server)."""
    attrs = {"header_timeout_s": timeout_s, "max_connections": max_connections,
             "max_per_client": max_per_client, "per_client": Counter()}
    return type("BoundedH11Protocol", (_BoundedProtocol,), attrs)
