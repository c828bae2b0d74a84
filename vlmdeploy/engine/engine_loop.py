"""Runs the engine's step loop on a background thread.

Front ends talk to it with three thread-safe calls — :meth:`EngineLoop.add`,
:meth:`EngineLoop.abort`, :meth:`EngineLoop.close` — and receive :class:`StepOutput` objects through
the per-request callback given to
``add`` (called on the engine thread: callbacks must only hand the output over, e.g. to a queue). If
a step raises, the engine is broken: every in-flight request gets an ``error`` output and later
calls fail fast.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from vlmdeploy.engine.llm_engine import LLMEngine, StepOutput
from vlmdeploy.engine.sequence import Sequence
from vlmdeploy.errors import EngineDeadError

logger = logging.getLogger("vlmdeploy")
Callback = Callable[[StepOutput], None]


class EngineLoop:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.error: BaseException | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._callbacks: dict[int, Callback] = {}
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="vlmdeploy-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self.error is None and self._thread.is_alive()

    def add(self, seq: Sequence, callback: Callback) -> None:
        if self.error is not None:
            raise EngineDeadError("the engine has stopped after an internal error") from self.error
        self._inbox.put(("add", seq, callback))
        self._wake.set()

    def abort(self, seq_id: int) -> None:
        self._inbox.put(("abort", seq_id, None))
        self._wake.set()

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

    def _drain(self) -> None:
        while True:
            try:
                kind, item, callback = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._callbacks[item.seq_id] = callback
                try:
                    self.engine.add(item)
                except (
                    ValueError
                ) as exc:  # validated by the front end; kept as a last line of defence
                    logger.warning("request %d refused: %s", item.seq_id, exc)
                    self._deliver(StepOutput(item.seq_id, None, None, "error", len(item), 0, 0))
            elif (out := self.engine.abort(item)) is not None:
                self._deliver(out)

    def _deliver(self, out: StepOutput) -> None:
        callback = (
            self._callbacks.pop(out.seq_id, None)
            if out.finish_reason
            else self._callbacks.get(out.seq_id)
        )
        if callback is not None:
            try:
                callback(out)
            except Exception:  # a consumer that went away must not take the engine down
                logger.exception("output callback of request %d failed", out.seq_id)

    def _run(self) -> None:
        while not self._stop:
            self._drain()
            if not self.engine.has_work():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except BaseException as exc:  # noqa: BLE001 — any failure here leaves KV state unknown
                logger.exception("engine step failed; failing all requests")
                self.error = exc
                for seq_id in list(self._callbacks):
                    self._deliver(StepOutput(seq_id, None, None, "error", 0, 0, 0))
                return
            for out in outputs:
                self._deliver(out)
