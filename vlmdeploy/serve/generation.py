"""One choice = one engine request: stream its deltas, cut at stop strings, abort it if abandoned.

`run_choice` owns the engine request's lifetime. However its consumer stops (finished, client gone,
stop string matched, cancelled), the `finally` block aborts the request in the engine unless the
engine already finished it, so its KV blocks return to the pool at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from vlmdeploy.frontend.stop_words import StopMatcher
from vlmdeploy.serve.contract import OutputDelta, ServedPipeline
from vlmdeploy.serve.metrics import ServerMetrics

logger = logging.getLogger("vlmdeploy.serve")


class EngineRequestError(RuntimeError):
    """The engine ended a request with finish_reason 'error'."""


@dataclass
class Delta:
    """New output of one choice. `finish_reason` is set on the last delta only."""

    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class ChoiceResult:
    """A whole choice, accumulated from its deltas (non-streaming responses)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def add(self, delta: Delta) -> None:
        self.text += delta.text
        self.token_ids += delta.token_ids
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            self.prompt_tokens = delta.prompt_tokens
            self.completion_tokens = delta.completion_tokens
            self.cached_tokens = delta.cached_tokens


async def run_choice(
    pipe: ServedPipeline,
    prepared: Any,
    session_id: int,
    stops: list[str],
    metrics: ServerMetrics,
    arrival: float,
) -> AsyncIterator[Delta]:
    """Deltas of one engine request; the last one has `finish_reason` and the token counts."""
    matcher = StopMatcher(stops)
    finished, first_token_at, last, reason = False, None, None, None
    started = time.monotonic()
    stream = pipe.generate_prepared(prepared, session_id)
    try:
        async for out in stream:
            last = out
            if first_token_at is None and out.token_ids:
                first_token_at = time.monotonic()
            text, stopped = matcher.feed(out.text or "")
            reason = "stop" if stopped else out.finish_reason
            if reason == "error":
                pipe.stats()  # raises EngineDeadError (503, server marked dead) if it died
                raise EngineRequestError("the engine failed this request")
            if reason is not None and not stopped:
                text += matcher.flush()
            yield _delta(out, text, reason)
            if reason is not None:
                finished = not stopped  # a stop string leaves the engine request running
                break
        else:  # the engine ended the stream without a reason: report it as aborted
            if last is not None:
                finished, reason = True, "abort"
                yield _delta(last, matcher.flush(), "abort", with_ids=False)
    finally:  # synchronous work first: under cancellation, the await below may be interrupted
        if not finished:
            _abort(pipe, session_id)
        if last is not None:
            requested = getattr(getattr(prepared, "gen_config", None), "max_new_tokens", None)
            metrics.observe(arrival, first_token_at, last.input_token_len, last.generate_token_len,
                            started=started, finish_reason=reason or "abort",
                            max_tokens=requested or max(pipe.session_len - last.input_token_len,
                                                        0),
                            requested_max_tokens=requested)
        await stream.aclose()


def _delta(out: OutputDelta, text: str, reason: str | None, with_ids: bool = True) -> Delta:
    ids = list(out.token_ids or []) if with_ids else []
    logprobs = out.logprobs if with_ids else None
    return Delta(
        text=text,
        token_ids=ids,
        logprobs=logprobs,
        finish_reason=reason,
        prompt_tokens=out.input_token_len,
        completion_tokens=out.generate_token_len,
        cached_tokens=out.cached_tokens or 0,
    )


def _abort(pipe: ServedPipeline, session_id: int) -> None:
    try:
        pipe.abort(session_id)
    except Exception:  # the request may already be gone; aborting must never fail a response
        logger.warning("abort of session %d failed", session_id, exc_info=True)
