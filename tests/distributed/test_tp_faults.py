"""A tensor-parallel worker that dies mid-generation: every request ends with an error within
seconds, the server answers 503 and fails ``/health``, ``close()`` returns and no worker process is
left behind."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from vlmdeploy import PytorchEngineConfig, pipeline
from vlmdeploy.engine.io import EngineRequest
from vlmdeploy.engine.sampling import SamplingParams
from vlmdeploy.errors import EngineDeadError

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from vlmdeploy.serve import create_app  # noqa: E402


def test_a_killed_worker_ends_every_request_and_leaves_no_process(tiny_ckpts):
    cfg = PytorchEngineConfig(tp=2, device_type="cpu", session_len=4096, max_batch_size=8)
    pipe = pipeline(tiny_ckpts["hf"], backend_config=cfg, log_level="ERROR")
    died: list[int] = []
    client = TestClient(create_app(pipe, on_engine_dead=lambda: died.append(1)))
    worker = pipe.engine.core.executor.procs[0]

    finals: dict[int, object] = {}
    tokens = {i: 0 for i in range(3)}
    all_done = threading.Event()

    def callback(out):
        if out.token_id is not None:
            tokens[out.seq_id] += 1
        if out.finish_reason:
            finals[out.seq_id] = out
            if len(finals) == len(tokens):
                all_done.set()

    for i in tokens:
        sampling = SamplingParams(max_new_tokens=4000, stop_token_ids=frozenset())
        pipe.engine.add(EngineRequest(i, [1, 2, 3, 4 + i], sampling), callback)
    deadline = time.monotonic() + 60
    while min(tokens.values()) < 3 and time.monotonic() < deadline:  # all three generating
        time.sleep(0.05)
    assert min(tokens.values()) >= 3 and not finals

    os.kill(worker.pid, signal.SIGKILL)
    killed = time.monotonic()
    assert all_done.wait(30), f"requests still pending 30 s after a worker died: {finals}"
    assert time.monotonic() - killed < 30
    assert {out.finish_reason for out in finals.values()} == {"error"}
    assert not pipe.engine.alive
    with pytest.raises(EngineDeadError):
        pipe.engine.stats()

    health = client.get("/health")
    assert health.status_code == 503
    chat = {"model": pipe.model_name, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4}  # fmt: skip
    assert client.post("/v1/chat/completions", json=chat).status_code == 503

    start = time.monotonic()
    pipe.close()
    assert time.monotonic() - start < 30
    assert worker.poll() is not None  # no process left behind


def test_close_stops_every_worker_in_bounded_time(tiny_ckpts):
    cfg = PytorchEngineConfig(tp=2, device_type="cpu", session_len=512)
    pipe = pipeline(tiny_ckpts["original"], backend_config=cfg, log_level="ERROR")
    procs = list(pipe.engine.core.executor.procs)
    out = pipe("hello", gen_config=None)
    assert out.finish_reason in ("stop", "length")
    start = time.monotonic()
    pipe.close()
    assert time.monotonic() - start < 30
    assert all(p.poll() == 0 for p in procs)  # each worker left on the stop message, cleanly


def test_close_with_a_guided_step_in_flight_stops_every_worker_cleanly(tiny_ckpts):
    """A guided step's sampling is queued at the next launch; closing with one in flight still
    sends its tokens, which the workers wait for before they take the stop message."""
    from vlmdeploy.testing.guides import AllowOnly

    cfg = PytorchEngineConfig(tp=2, device_type="cpu", session_len=512)
    pipe = pipeline(tiny_ckpts["original"], backend_config=cfg, log_level="ERROR")
    procs = list(pipe.engine.core.executor.procs)
    engine = pipe.engine.detach()
    engine.add(EngineRequest(1, list(range(20, 40)), SamplingParams(
        max_new_tokens=50, guide=AllowOnly(range(100, 200)))))
    for _ in range(4):
        engine.step()
    assert engine._inflight is not None and engine._inflight.result is None  # deferred
    start = time.monotonic()
    engine.release()
    assert time.monotonic() - start < 20
    assert all(p.wait(10) == 0 for p in procs)  # each left on the stop message, not killed
