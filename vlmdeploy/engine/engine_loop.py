"""Runs the engine's step loop on a background thread.

The thread first runs :meth:`LLMEngine.warm_up` (caches that libraries keep per thread, such as
cuDNN's attention plans, must be filled on the thread that steps), and the constructor returns once
that is done, or raises what it raised.

Front ends talk to it with three thread-safe calls — :meth:`EngineLoop.add`,
:meth:`EngineLoop.abort` and :meth:`EngineLoop.close` — and receive :class:`StepOutput` objects
through the per-request callback given to ``add`` (called on the engine thread: callbacks must only
hand the output over, e.g. to a queue). A :class:`Subscription` callback instead tags the output
with its key and sends it through a :class:`Channel` shared by many requests; a step's outputs for
one channel go over in one ``send``, so a consumer of hundreds of streams wakes once per step, not
once per token. Every accepted request gets exactly one final output: its
finish, an ``error`` if a step raises (the engine is then broken and later calls fail fast), or an
``abort`` when the loop is closed — requests still queued in the inbox included.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from vlmdeploy import env
from vlmdeploy.engine.io import EngineRequest, StepOutput
from vlmdeploy.engine.llm_engine import LLMEngine
from vlmdeploy.engine.observer import EngineObserver
from vlmdeploy.errors import EngineDeadError

logger = logging.getLogger("vlmdeploy")


class Channel(Protocol):
    def send(self, items: list[tuple[Any, StepOutput]]) -> None:
        """Hand ``(key, output)`` pairs over to the consumer (called on the engine thread)."""


@dataclass(frozen=True, eq=False)
class Subscription:
    """A request's outputs, tagged with ``key``, go to ``channel``: batched per step."""

    channel: Channel
    key: Any

    def __call__(self, out: StepOutput) -> None:
        self.channel.send([(self.key, out)])


Callback = Callable[[StepOutput], None] | Subscription


class EngineLoop:
    """The engine's client: what a front end holds. ``core`` is the engine itself, for in-process
    inspection (tests, benchmarks); front ends use only the methods below."""

    def __init__(self, engine: LLMEngine, step_timeout_s: float | None = None):
        """``step_timeout_s``: a step running longer than this means the engine hangs (a kernel
        that never ends, a deadlock): every request then ends with an error and the loop reports
        itself dead. None reads ``VLMDEPLOY_STEP_TIMEOUT_S``; 0 turns the watchdog off."""
        self.core = engine
        self.step_timeout_s = env.step_timeout_s() if step_timeout_s is None else step_timeout_s
        self._step_started: float | None = None  # monotonic start of the step in progress
        self.error: BaseException | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._callbacks: dict[int, Callback] = {}
        self._wake = threading.Event()
        # Guards the open/closed state together with the inbox, so no request can slip into the
        # inbox after the loop has stopped taking work (it would wait forever).
        self._lock = threading.Lock()
        self._closed: str | None = None  # None while serving; then "error" or "closed"
        # Guards the callbacks: the watchdog may end every request while the engine thread runs.
        self._deliver_lock = threading.RLock()
        self._ready = threading.Event()
        self._stopping = threading.Event()  # wakes the watchdog at once when the loop stops
        self._thread = threading.Thread(target=self._serve, name="vlmdeploy-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self.error is not None:
            self._thread.join()
            raise self.error
        _LIVE.add(self)
        if self.step_timeout_s or engine.distributed:
            threading.Thread(target=self._watch, name="vlmdeploy-watchdog", daemon=True).start()

    @property
    def thread(self) -> threading.Thread:
        """The thread that steps the engine (what profilers and samplers watch)."""
        return self._thread

    @property
    def running(self) -> bool:
        """The loop's thread is still running (it may be finishing a step after close())."""
        return self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._closed is None and self._thread.is_alive()

    @property
    def observer(self) -> EngineObserver:
        return self.core.observer

    @property
    def session_len(self) -> int:
        return self.core.cfg.session_len

    def check_fits(self, num_prompt_tokens: int, max_new_tokens: int) -> str | None:
        """Why a request of this size can never run (None if it can)."""
        return self.core.check_fits(num_prompt_tokens, max_new_tokens)

    def has_cached_image(self, content_hash: str) -> bool:
        """A hint: the engine holds this image's embedding now (it may be gone when the request
        arrives, so an image sent without tiles must carry a way to make them)."""
        return self.core.has_cached_image(content_hash)

    def stats(self) -> dict[str, float | int]:
        """Engine load; raises :class:`EngineDeadError` once the engine has failed."""
        if not self.alive:
            raise EngineDeadError("the engine has stopped after an internal error")
        return self.core.stats()

    def add(self, request: EngineRequest, callback: Callback) -> None:
        with self._lock:
            if self._closed == "error":
                raise EngineDeadError("the engine has stopped after an internal error") from (
                    self.error
                )
            if self._closed == "closed":
                raise EngineDeadError("the pipeline has been closed")
            self._inbox.put(("add", request, callback))
        self._wake.set()

    def abort(self, seq_id: int) -> None:
        self._inbox.put(("abort", seq_id, None))
        self._wake.set()

    def close(self) -> None:
        """Stop the loop (every request still in flight gets a final ``abort`` output) and give the
        engine's memory back."""
        if self._stop():  # never pull the model from under a step in progress
            self.core.release()
        else:  # stuck in a step: its memory goes with the process, but no worker outlives it
            self.core.abandon()

    def detach(self) -> LLMEngine:
        """Stop the loop without releasing the engine and hand the engine over, to be stepped by
        hand from now on (profilers and other diagnostics). Requests in flight end with abort."""
        if not self._stop():
            raise RuntimeError("the engine thread did not stop")
        return self.core

    def _stop(self) -> bool:
        """Stop taking work and wait for the thread; whether it has ended."""
        with self._lock:
            if self._closed is None:
                self._closed = "closed"
        self._wake.set()
        self._stopping.set()
        hung = self._step_started is not None and self._closed == "error"
        self._thread.join(timeout=1 if hung else 60)  # a hung step may never return
        return not self._thread.is_alive()

    def _drain(self) -> None:
        while True:
            try:
                kind, item, callback = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._admit(item, callback)
            elif (out := self.core.abort(item)) is not None:
                self._deliver(out)

    def _admit(self, request: EngineRequest, callback: Callback) -> None:
        rid = request.request_id
        with self._deliver_lock:
            if rid in self._callbacks:  # never hijack the running request's stream
                _call(callback, _final(rid, "error", f"request id {rid} is in use"))
                return
            self._callbacks[rid] = callback
        try:
            self.core.add(request)
        except ValueError as exc:  # validated by the front end; kept as a last line of defence
            logger.warning("request %d refused: %s", rid, exc)
            self._deliver(_final(rid, "error", str(exc)))

    def _deliver(self, out: StepOutput) -> None:
        self._deliver_step([out])

    def _serve(self) -> None:
        try:
            self.core.warm_up()
        except BaseException as exc:  # noqa: BLE001 — handed to the constructor, which raises it
            self.error = exc
            self._closed = "error"
            return
        finally:
            self._ready.set()
        while self._closed is None:
            self._drain()
            if not self.core.has_work():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            self._step_started = time.monotonic()
            try:
                outputs = self.core.step()
            except BaseException as exc:  # noqa: BLE001 — any failure here leaves KV state unknown
                logger.exception("engine step failed; failing all requests")
                self.error = exc
                self._shut("error", "the engine failed")
                return
            finally:
                self._step_started = None
            self._deliver_step(outputs)
        self._shut("abort", "the pipeline was closed")

    def _watch(self) -> None:
        """The watchdog: ends every request and marks the loop dead when a step hangs or the
        engine reports a failure of its own (a tensor-parallel worker gone)."""
        period = min(1.0, self.step_timeout_s / 4) if self.step_timeout_s else 0.5
        while not self._stopping.wait(period) and self._closed is None:
            failure = self.core.failure()
            if failure is not None:
                logger.error("%s; failing all requests", failure)
                self.error = RuntimeError(failure)
                self._shut("error", failure)
                return
            started = self._step_started
            if not self.step_timeout_s:
                continue
            if started is not None and time.monotonic() - started > self.step_timeout_s:
                message = f"the engine stopped responding (a step ran over {self.step_timeout_s} s)"
                logger.error("%s; failing all requests", message)
                self.error = TimeoutError(message)
                self._shut("error", message)
                return

    def _deliver_step(self, outputs: list[StepOutput]) -> None:
        batches: dict[int, tuple[Channel, list[tuple[Any, StepOutput]]]] = {}
        with self._deliver_lock:
            calls = []
            for out in outputs:
                if out.finish_reason:
                    callback = self._callbacks.pop(out.seq_id, None)
                else:
                    callback = self._callbacks.get(out.seq_id)
                if isinstance(callback, Subscription):
                    batches.setdefault(id(callback.channel), (callback.channel, []))[1].append(
                        (callback.key, out)
                    )
                elif callback is not None:
                    calls.append((callback, out))
        for callback, out in calls:
            _call(callback, out)
        for channel, items in batches.values():
            try:
                channel.send(items)
            except Exception:  # a consumer that went away must not take the engine down
                logger.exception("output channel of %d requests failed", len(items))

    def _shut(self, reason: str, message: str) -> None:
        """Stop taking work and give every request — running or still queued — a final output."""
        with self._lock:
            self._closed = self._closed or ("error" if reason == "error" else "closed")
        while True:
            try:
                kind, item, callback = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                _call(callback, _final(item.request_id, reason, message))
        with self._deliver_lock:
            pending = list(self._callbacks)
        self._deliver_step([_final(seq_id, reason, message) for seq_id in pending])


_LIVE: weakref.WeakSet[EngineLoop] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    """At interpreter exit, stop every engine thread still running (a pipeline never closed)
    before the runtime tears down what it uses: a thread still inside a torch call then aborts
    the whole process ("terminate called without an active exception")."""
    for loop in list(_LIVE):
        loop._stop()


def _final(seq_id: int, reason: str, message: str | None = None) -> StepOutput:
    return StepOutput(seq_id, None, None, reason, 0, 0, 0, error=message)


def _call(callback: Callback, out: StepOutput) -> None:
    try:
        callback(out)
    except Exception:  # a consumer that went away must not take the engine down
        logger.exception("output callback of request %d failed", out.seq_id)
