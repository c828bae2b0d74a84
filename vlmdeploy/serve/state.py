"""What the routes share: the pipeline, settings, metrics, admission counter, engine health and the
shutdown stage (:mod:`vlmdeploy.serve.shutdown`)."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from vlmdeploy.frontend.limits import default_max_prompt_chars
from vlmdeploy.serve.config import ServerConfig
from vlmdeploy.serve.contract import ServedPipeline
from vlmdeploy.serve.errors import APIError, shutting_down
from vlmdeploy.serve.metrics import ServerMetrics
from vlmdeploy.serve.reasoning import ReasoningSplitter
from vlmdeploy.serve.shutdown import Closing

logger = logging.getLogger("vlmdeploy.serve")


class Slot:
    """One admitted request; `release` is idempotent so every exit path may call it."""

    def __init__(self, admission: Admission):
        self._admission: Admission | None = admission

    def release(self) -> None:
        if self._admission is not None:
            self._admission.release()
            self._admission = None


class Admission:
    """Bounds generation requests in flight. Beyond `limit`, requests wait for a slot in arrival
    order (LMDeploy's `--max-concurrent-requests` semantics); beyond `max_waiting` waiting ones, a
    request is answered 429 at once (the SDKs back off on 429 and `Retry-After`). A slot freed
    goes straight to the longest-waiting request."""

    def __init__(self, limit: int | None, max_waiting: int = 0):
        self.limit = limit
        self.max_waiting = max_waiting
        self.in_flight = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def try_enter(self) -> Slot | None:
        """A slot now, or None if the request must wait (429 if it may not)."""
        if self.limit is None or (self.in_flight < self.limit and not self.waiting):
            self.in_flight += 1
            return Slot(self)
        if self.waiting >= self.max_waiting:
            raise APIError(429, "The server is handling too many requests; retry shortly.",
                           code="rate_limit_exceeded", headers={"Retry-After": "1"})
        return None

    async def wait(self) -> Slot:
        """Wait for a slot (after `try_enter` said so). Cancelled, it takes none."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():  # handed a slot as it was cancelled
                self.release()
            else:
                self._waiters.remove(waiter)
            raise
        return Slot(self)

    def release(self) -> None:
        if self._waiters:
            self._waiters.popleft().set_result(None)  # the slot passes on; in_flight stays
        else:
            self.in_flight -= 1


@dataclass
class ServerState:
    pipe: ServedPipeline
    config: ServerConfig
    media_policy: Any
    metrics: ServerMetrics
    admission: Admission
    on_engine_dead: Callable[[], None] | None = None
    engine_dead: bool = False
    draining: bool = False  # shutdown has begun: new requests are refused
    closing: Closing = field(default_factory=Closing)  # the grace is over: in-flight requests end

    @property
    def model_name(self) -> str:
        return self.pipe.model_name

    @property
    def max_prompt_chars(self) -> int:
        """The prompt text cap: the operator's, else derived from the pipeline's session_len."""
        return self.config.max_prompt_chars or default_max_prompt_chars(self.pipe.session_len)

    def next_session_id(self) -> int:
        # Ids come from the pipeline, so they never collide with requests made through its Python
        # API in the same process.
        return self.pipe.new_session_id()

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model {name!r} does not exist.", code="model_not_found",
                           param="model")

    def check_alive(self) -> None:
        if self.engine_dead:
            raise APIError(503, "The engine is not available.", code="service_unavailable",
                           headers={"Retry-After": "5"})
        if self.draining:
            raise shutting_down()

    def begin_shutdown(self) -> None:
        """Drain now; end whatever is still in flight after `shutdown_timeout` seconds."""
        if self.draining:
            return
        self.draining = True
        grace = self.config.shutdown_timeout
        logger.info("shutting down: %d requests in flight may take up to %.1f s",
                       self.admission.in_flight, grace)
        asyncio.get_running_loop().call_later(grace, self.closing.set)

    def mark_dead(self) -> None:
        if not self.engine_dead:
            logger.critical("the engine has failed; the server stops accepting requests")
            self.engine_dead = True
            if self.on_engine_dead is not None:
                self.on_engine_dead()

    def splitter(self, enable_thinking: bool | None) -> ReasoningSplitter | None:
        name = self.config.reasoning_parser
        return None if name is None else ReasoningSplitter.for_parser(name, enable_thinking)


def get_state(request: Request) -> ServerState:
    return request.app.state.server
