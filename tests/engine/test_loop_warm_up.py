"""The engine loop warms the engine on its own thread before it takes requests: caches that
libraries keep per thread (cuDNN's attention plans) are only useful on the thread that steps."""

from __future__ import annotations

import threading
import time

import pytest

from vlmdeploy.engine.engine_loop import EngineLoop


class StubEngine:
    """Just enough of LLMEngine for the loop: it never has work."""

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.warmed_on: str | None = None

    def warm_up(self) -> None:
        time.sleep(0.2)  # the constructor must wait for this, not race it
        self.warmed_on = threading.current_thread().name
        if self.fail:
            raise RuntimeError("no memory for the warm-up")

    def has_work(self) -> bool:
        return False

    distributed = False

    def failure(self) -> None:
        return None

    def release(self) -> None:
        self.released = True


def test_warm_up_runs_on_the_engine_thread_before_the_loop_is_returned():
    engine = StubEngine()
    loop = EngineLoop(engine)
    try:
        assert engine.warmed_on == "vlmdeploy-engine"
        assert loop.alive
    finally:
        loop.close()
    assert engine.released  # closing the loop gives the engine's memory back


def test_a_failed_warm_up_fails_the_constructor_and_leaves_no_loop():
    engine = StubEngine(fail=True)
    with pytest.raises(RuntimeError, match="no memory"):
        EngineLoop(engine)
    assert engine.warmed_on == "vlmdeploy-engine"



def test_detach_hands_the_engine_over_without_releasing_it():
    engine = StubEngine()
    loop = EngineLoop(engine)
    assert loop.detach() is engine
    assert not loop.running and not hasattr(engine, "released")  # to be stepped by hand now
