"""Plumbing shared by the generation routes: SSE framing, merging the streams of `n` choices, and
watching for a client that goes away or for the end of the shutdown grace
(:class:`~vlmdeploy.serve.shutdown.Closing`).

Every stream is closed deterministically (`aclosing`), never left to the garbage collector, because
closing a choice's stream is what aborts its engine request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from vlmdeploy.serve.errors import shutting_down
from vlmdeploy.serve.shutdown import Closing

T = TypeVar("T")
DONE = b"data: [DONE]\n\n"


class ClientGone(Exception):
    """The client disconnected before the response was ready."""


def sse(payload: dict[str, Any]) -> bytes:
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return b"data: " + text.encode() + b"\n\n"


class SSEResponse(StreamingResponse):
    """A `text/event-stream` response that always closes its event generator and runs `on_close`,
    whether the stream ended, failed or the client left. When `closing` is set first (the
    shutdown grace is over), the stream is cut and ends with the frames of `farewell()`."""

    def __init__(self, events: AsyncGenerator[bytes, None], on_close: Callable[[], None],
                 closing: Closing | None = None,
                 farewell: Callable[[], list[bytes]] | None = None):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._events = events
        self._on_close = on_close
        self._closing = closing
        self._farewell = farewell

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            if self._closing is None:
                await super().__call__(scope, receive, send)
            else:
                await self._stream_until_closing(receive, send)
        finally:
            try:
                await self._events.aclose()
            finally:
                self._on_close()

    async def _stream_until_closing(self, receive: Receive, send: Send) -> None:
        assert self._closing is not None
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        stream = asyncio.ensure_future(self.stream_response(tracked))
        gone = asyncio.ensure_future(self.listen_for_disconnect(receive))
        over = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait({stream, gone, over}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stream, gone, over):
                if not task.done():
                    task.cancel()
            await asyncio.gather(stream, gone, over, return_exceptions=True)
        if not stream.cancelled():
            task_result(stream)  # ended (or failed) on its own
        elif not over.cancelled() and gone.cancelled():  # the grace ran out, the client is there
            await self._events.aclose()  # aborts the engine requests before the last frames
            await self._send_farewell(send, started)

    async def _send_farewell(self, send: Send, started: bool) -> None:
        if not started:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
        for frame in self._farewell() if self._farewell is not None else [DONE]:
            await send({"type": "http.response.body", "body": frame, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def merge(streams: list[AsyncGenerator[T, None]]) -> AsyncIterator[tuple[int, T]]:
    """Items of several streams as they come, tagged with the stream's index. Closing the merge
    closes (or cancels) every stream."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:
            async for item in only:
                yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any, BaseException | None, bool]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncGenerator[T, None]) -> None:
        try:
            async with aclosing(stream):
                async for item in stream:
                    queue.put_nowait((index, item, None, False))
        except Exception as exc:
            queue.put_nowait((index, None, exc, True))
            return
        queue.put_nowait((index, None, None, True))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item, error, done = await queue.get()
            if error is not None:
                raise error
            if done:
                remaining -= 1
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, work: Awaitable[T],
                             closing: Closing | None = None) -> T:
    """Await `work`, cancelling it if the client disconnects first (raising ClientGone) or if
    `closing` is set first (raising the 503 `server_shutting_down` error)."""
    task = asyncio.ensure_future(work)
    watchers = [asyncio.ensure_future(_wait_disconnect(request))]
    if closing is not None:
        watchers.append(asyncio.ensure_future(closing.wait()))
    try:
        await asyncio.wait({task, *watchers}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, *watchers):
            if not pending.done():
                pending.cancel()
        await asyncio.gather(task, *watchers, return_exceptions=True)
    if not task.cancelled():
        return task_result(task)
    if closing is not None and closing.is_set():
        raise shutting_down()
    raise ClientGone()


def task_result(task: asyncio.Future[T]) -> T:
    """The task's result or its exception, raised without a reference cycle through this frame
    (an exception that keeps its frames alive keeps a refused request's body alive with them)."""
    error = task.exception()
    if error is None:
        return task.result()
    del task
    try:
        raise error
    finally:
        del error
