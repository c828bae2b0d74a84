"""uvicorn's h11 protocol with a deadline on request headers and a cap on their size.

uvicorn closes idle keep-alive connections but puts no limit on how long a client may take to send a
request's headers: a client that trickles one byte a second holds a connection forever. This
subclass arms a timer whenever the connection waits for a new request and closes the connection if
the headers have not all arrived when it fires. It also caps the header block (64 KiB): h11 enforces
its own cap only on headers that arrive in pieces, so a block read in one go is counted here and
answered 431.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

_TOO_LARGE_BODY = json.dumps({"error": {
    "message": "Request headers are too large.", "type": "invalid_request_error", "param": None,
    "code": "request_header_fields_too_large"}}).encode()
_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
              b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
              % (len(_TOO_LARGE_BODY), _TOO_LARGE_BODY))


class _HeaderDeadlineProtocol(H11Protocol):
    header_timeout_s: float = 10.0
    max_header_bytes: int = 64 * 1024

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        self._arm_header_timer()
        if self._waiting_for_request():
            # h11 only bounds headers that arrive in pieces; count the block here before parsing
            end = data.find(b"\r\n\r\n")
            size = self._header_bytes + (len(data) if end < 0 else end)
            if size > self.max_header_bytes:
                if not self.transport.is_closing():
                    self.transport.write(_TOO_LARGE)
                    self.transport.close()
                return
            self._header_bytes = 0 if end >= 0 else size
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
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


def header_deadline_protocol(timeout_s: float) -> type[Any]:
    """An h11 protocol class for `uvicorn.Config(http=...)` with the given header deadline."""
    attrs = {"header_timeout_s": timeout_s}
    return type("HeaderDeadlineProtocol", (_HeaderDeadlineProtocol,), attrs)
