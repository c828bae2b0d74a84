"""Shutdown in two stages: drain, then close.

When uvicorn starts shutting down (SIGTERM, SIGINT), it stops accepting connections and the server
starts to *drain*: `/health` and every new request on a kept-alive connection answer 503
`server_shutting_down`, while requests in flight go on. When `shutdown_timeout` seconds have
passed, :class:`Closing` is set and every unfinished request ends with an error in OpenAI's
envelope: a 503 JSON body if its response has not started, otherwise (a stream) a chunk with
`finish_reason: "abort"` for each unfinished choice, an SSE error event and `data: [DONE]`. Its
engine requests are aborted. uvicorn itself waits `SHUTDOWN_MARGIN_S` longer before it cancels
what is left, so its own plain-text 500 is only the last resort for a stuck connection.
"""

from __future__ import annotations

import asyncio

# uvicorn's own graceful-shutdown limit exceeds ours by this much: the server ends its requests
# first, with proper errors.
SHUTDOWN_MARGIN_S = 3.0


class Closing:
    """Set once in-flight requests must end. Each wait uses an event of its caller's loop (a test
    client may run each request on a loop of its own); ``set`` is called on the server's loop."""

    def __init__(self) -> None:
        self._set = False
        self._events: set[asyncio.Event] = set()

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        for event in list(self._events):
            event.set()

    async def wait(self) -> None:
        if self._set:
            return
        event = asyncio.Event()
        self._events.add(event)
        try:
            await event.wait()
        finally:
            self._events.discard(event)
