"""Submitting prepared requests to the engine and streaming their outputs back.

The engine thread hands a step's outputs over in one batch per consumer
(:class:`~vlmdeploy.engine.engine_loop.Subscription` on a channel), so a consumer of hundreds of
streams wakes once per step instead of once per token:

* :meth:`Streamer.generate` (the server's path): one channel per asyncio event loop, which wakes
  the loop once per step and dispatches to each request's ``asyncio.Queue``;
* :meth:`Streamer.stream` (``stream_infer``, ``__call__``): one queue for a whole batch of prompts,
  which also receives each prompt as the preparation pool finishes it, so image decoding overlaps
  generation.

Whoever stops reading a stream aborts its request, unless the engine has already ended it, so its
KV blocks go back to the pool at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import queue
import threading
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Any

from vlmdeploy.engine.engine_loop import Callback, EngineLoop, Subscription
from vlmdeploy.engine.io import EngineRequest, StepOutput
from vlmdeploy.errors import InvalidRequestError
from vlmdeploy.frontend.guided import FORMAT_FAILED, Guide
from vlmdeploy.frontend.output import GenOut, OutputProcessor, to_response
from vlmdeploy.frontend.prepare import PreparedRequest, Preparer
from vlmdeploy.frontend.tokenizer import Tokenizer
from vlmdeploy.messages import GenerationConfig, Response


class Streamer:
    """Hands prepared requests to the engine and turns their outputs into deltas."""

    def __init__(self, engine: EngineLoop, tokenizer: Tokenizer, preparer: Preparer):
        self.engine = engine
        self.tokenizer = tokenizer
        self.preparer = preparer
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._channels: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopChannel] = (
            weakref.WeakKeyDictionary()
        )

    def new_id(self) -> int:
        """A request id no other request of this pipeline uses (thread-safe)."""
        with self._lock:
            return next(self._ids)

    def submit(self, req: PreparedRequest, request_id: int, callback: Callback) -> Guide | None:
        """Hand ``req`` to the engine; returns the guide whose record tells why its grammar
        failed, if it has one."""
        sampling = req.sampling
        if sampling.guide is not None:  # a failure record of this request's own
            sampling = dataclasses.replace(sampling, guide=sampling.guide.for_request())
        request = EngineRequest(request_id, req.token_ids, sampling, req.images)
        self.engine.add(request, callback)
        return sampling.guide

    async def generate(self, req: PreparedRequest, request_id: int) -> AsyncIterator[GenOut]:
        """Stream the deltas of a prepared request; leaving early (or being cancelled) aborts it.
        A request whose grammar failed while it ran (a resource limit of its response_format)
        raises :class:`InvalidRequestError` instead of its failed last delta: the format was the
        caller's, so the server answers 400, not 500."""
        q: asyncio.Queue[StepOutput] = asyncio.Queue()
        guide = self.submit(req, request_id, Subscription(self._loop_channel(), q))
        proc = OutputProcessor(self.tokenizer, req)
        try:
            while proc.finish_reason is None:
                out = proc.process(await q.get())
                if out.finish_reason == "error" and guide is not None and guide.failure:
                    raise InvalidRequestError(
                        f"response_format could not be followed: {guide.failure}; simplify it",
                        code=FORMAT_FAILED,
                        param="response_format",
                    )
                yield out
        finally:
            if not proc.engine_done:
                self.engine.abort(request_id)

    def stream(
        self,
        prompts: list[Any],
        gen_configs: list[GenerationConfig | None],
        do_preprocess: bool,
        incremental: bool,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> Iterator[Response]:
        """``Response`` deltas of many prompts, in the order outputs arrive (``index`` is the
        prompt's position). Without ``incremental``, text is decoded once at the end of each
        request (unless stop words need it earlier): for callers that only want whole responses.
        A prompt that fails to prepare raises here; the batch's other requests are aborted."""
        q: queue.SimpleQueue[tuple[str, Any, Any]] = queue.SimpleQueue()
        futures = [
            self.preparer.submit(p, g, do_preprocess, chat_template_kwargs)
            for p, g in zip(prompts, gen_configs, strict=True)
        ]
        for i, fut in enumerate(futures):
            fut.add_done_callback(lambda f, i=i: q.put(("ready", i, f)))
        procs: dict[int, tuple[int, OutputProcessor]] = {}
        channel = _QueueChannel(q)  # one hand-over per engine step for all these prompts
        waiting = len(prompts)
        try:
            while waiting or any(p.finish_reason is None for _, p in procs.values()):
                kind, key, value = q.get()
                if kind == "ready":
                    req = value.result()  # bad input raises here; the finally clause cleans up
                    waiting -= 1
                    rid = self.new_id()
                    procs[rid] = (key, OutputProcessor(self.tokenizer, req, incremental))
                    self.submit(req, rid, Subscription(channel, rid))
                    continue
                for rid, out in value:
                    i, proc = procs[rid]
                    if proc.finish_reason is None:
                        yield to_response(proc.process(out), i)
                        if proc.finish_reason is not None and not proc.engine_done:
                            self.engine.abort(rid)  # stopped by a stop word: free its blocks
        finally:
            for fut in futures:
                fut.cancel()
            for rid, (_, proc) in procs.items():
                if not proc.engine_done:
                    self.engine.abort(rid)

    def _loop_channel(self) -> _LoopChannel:
        """The running event loop's channel: all its requests' outputs of a step arrive in one
        callback on the loop."""
        loop = asyncio.get_running_loop()
        with self._lock:
            channel = self._channels.get(loop)
            if channel is None:
                channel = self._channels[loop] = _LoopChannel(loop)
        return channel


class _QueueChannel:
    """Outputs of many requests into one thread-safe queue, as one item per engine step."""

    def __init__(self, q: queue.SimpleQueue):
        self.q = q

    def send(self, items: list[tuple[Any, StepOutput]]) -> None:
        self.q.put(("outs", None, items))


class _LoopChannel:
    """Outputs of an event loop's requests, handed to the loop once per engine step; each key is
    the request's ``asyncio.Queue``."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = weakref.ref(loop)  # weak: the streamer's loop-keyed cache must not keep it

    def send(self, items: list[tuple[Any, StepOutput]]) -> None:
        loop = self.loop()
        if loop is not None and not loop.is_closed():  # the consumer's loop may be gone
            loop.call_soon_threadsafe(_dispatch, items)


def _dispatch(items: list[tuple[asyncio.Queue, StepOutput]]) -> None:
    for q, out in items:
        q.put_nowait(out)
