"""RELIABILITY §3.4 engine faults seen through the server, on the real pipeline with a tiny
checkpoint (CPU): a forward pass that raises (L5) fails the requests of its step with a 500, or an
SSE error frame and [DONE] once a stream has started, and the server serves on; failures that
persist, or a step that hangs (L8, the watchdog), make the engine dead: requests end with 503,
/health answers 503, and nothing waits forever."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from serve_helpers import assert_error, chat

from vlmdeploy import PytorchEngineConfig, pipeline
from vlmdeploy.serve import create_app

pytestmark = pytest.mark.slow
URL = "/v1/chat/completions"


@pytest.fixture
def pipe(tiny_checkpoint) -> Iterator[Any]:
    cfg = PytorchEngineConfig(device_type="cpu", session_len=1024)
    with pipeline(str(tiny_checkpoint), backend_config=cfg) as p:
        yield p


def sse_payloads(text: str) -> list[str]:
    frames = [f for f in text.split("\n\n") if f]
    assert all(f.startswith("data: ") for f in frames), frames
    return [f[len("data: "):] for f in frames]


def idle_with_free_blocks(pipe: Any) -> bool:
    stats = pipe.stats()
    return not stats["num_running"] and not stats["num_waiting"] and stats["kv_cache_usage"] == 0


def test_l5_a_forward_that_raises_fails_its_requests_and_the_server_serves_on(pipe):
    forward, armed = pipe.engine.core.runner.forward, [False]

    def flaky(*args: Any, **kwargs: Any) -> Any:
        if armed[0]:
            armed[0] = False
            raise RuntimeError("injected fault /secret/path")
        return forward(*args, **kwargs)

    pipe.engine.core.runner.forward = flaky
    client = TestClient(create_app(pipe))
    assert client.post(URL, json=chat("warm", max_tokens=2)).status_code == 200

    armed[0] = True
    error = assert_error(client.post(URL, json=chat("one", max_tokens=4)), 500, "server_error")
    assert "secret" not in error["message"] and error["type"] == "server_error"

    armed[0] = True
    response = client.post(URL, json=chat("two", max_tokens=4, stream=True))
    assert response.status_code == 200  # the stream had started: the error travels in it
    payloads = sse_payloads(response.text)
    assert payloads[-1] == "[DONE]"
    frame = json.loads(payloads[-2])
    assert frame["error"]["type"] == "server_error" and "secret" not in frame["error"]["message"]

    assert client.post(URL, json=chat("three", max_tokens=4)).status_code == 200
    assert client.get("/health").status_code == 200
    assert idle_with_free_blocks(pipe)


def test_l5_a_forward_that_keeps_raising_makes_the_engine_dead(pipe):
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected fault")

    died: list[int] = []
    client = TestClient(create_app(pipe, on_engine_dead=lambda: died.append(1)))
    pipe.engine.core.runner.forward = broken
    statuses = []
    for i in range(10):  # a few failed steps in a row, then the engine is declared dead
        statuses.append(client.post(URL, json=chat(f"try {i}", max_tokens=4)).status_code)
        if statuses[-1] == 503:
            break
    assert statuses[-1] == 503 and set(statuses[:-1]) <= {500}, statuses
    assert died == [1]
    assert_error(client.get("/health"), 503, "service_unavailable")
    assert_error(client.post(URL, json=chat("after", max_tokens=4)), 503)


def test_l8_a_hung_step_ends_its_requests_and_the_engine_reports_itself_dead(tiny_checkpoint,
                                                                            monkeypatch):
    monkeypatch.setenv("VLMDEPLOY_STEP_TIMEOUT_S", "1")
    cfg = PytorchEngineConfig(device_type="cpu", session_len=1024)
    with pipeline(str(tiny_checkpoint), backend_config=cfg) as pipe:
        release, step = threading.Event(), pipe.engine.core.step

        def hang() -> Any:
            release.wait(60)  # a kernel that never ends, until the test lets it go
            return step()

        died: list[int] = []
        client = TestClient(create_app(pipe, on_engine_dead=lambda: died.append(1)))
        assert client.post(URL, json=chat("warm", max_tokens=2)).status_code == 200
        pipe.engine.core.step = hang
        try:
            start = time.monotonic()
            response = client.post(URL, json=chat("stuck", max_tokens=4, stream=True))
            assert time.monotonic() - start < 10
            payloads = sse_payloads(response.text)
            assert payloads[-1] == "[DONE]" and "error" in json.loads(payloads[-2])
            assert died == [1]
            assert_error(client.get("/health"), 503, "service_unavailable")
            assert_error(client.post(URL, json=chat("after", max_tokens=4)), 503)
        finally:
            release.set()
