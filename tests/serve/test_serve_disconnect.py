"""Client disconnects abort their engine requests (RELIABILITY L3) and a full server answers 429
(L1), over real sockets (uvicorn on 127.0.0.1) with a slow FakePipeline.

The real-engine version (KV blocks back in the free pool) is in test_serve_real.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest
from fake_pipeline import FakePipeline
from serve_helpers import assert_error, chat, run_live

from vlmdeploy.serve import ServerConfig, create_app

URL = "/v1/chat/completions"
LONG = chat(max_tokens=100_000, ignore_eos=True)


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


@pytest.fixture
def slow() -> FakePipeline:
    return FakePipeline(token_delay=0.01, session_len=1_000_000)


def test_stream_disconnect_aborts_the_engine_request(slow):
    app = create_app(slow)
    with run_live(app) as url, httpx.Client(base_url=url) as http:
        with http.stream("POST", URL, json={**LONG, "stream": True}) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            for _ in range(6):
                next(lines)
            assert len(slow.live) == 1
        (session,) = slow.started
        wait_for(lambda: session in slow.aborted and not slow.live)
        wait_for(lambda: app.state.server.admission.in_flight == 0)


def test_non_stream_disconnect_aborts_the_engine_request(slow):
    app = create_app(slow)
    with run_live(app) as url, httpx.Client(base_url=url, timeout=0.3) as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post(URL, json={**LONG, "n": 2})
        wait_for(lambda: len(slow.started) == 2)
        wait_for(lambda: sorted(slow.aborted) == sorted(slow.started) and not slow.live)
        wait_for(lambda: app.state.server.admission.in_flight == 0)


def test_full_server_answers_429_with_retry_after(slow):
    # no room to wait either (beyond the slots, requests queue: tests/serve/test_serve_queue.py)
    app = create_app(slow, ServerConfig(max_concurrent_requests=2, max_queued_requests=0))
    with run_live(app) as url, httpx.Client(base_url=url) as http:
        with http.stream("POST", URL, json={**LONG, "stream": True}) as first:
            first_lines = first.iter_lines()  # keep a reference: a collected iterator hangs up
            next(first_lines)
            with http.stream("POST", URL, json={**LONG, "stream": True}) as second:
                second_lines = second.iter_lines()
                next(second_lines)
                refused = http.post(URL, json=chat())
                error = assert_error(refused, 429, "rate_limit_exceeded")
                assert error["type"] == "rate_limit_error"
                assert int(refused.headers["retry-after"]) >= 1
                assert http.get("/health").status_code == 200  # probes are never refused
            wait_for(lambda: app.state.server.admission.in_flight == 1)
            assert http.post(URL, json=chat(max_tokens=2)).status_code == 200
            assert next(line for line in first_lines if line).startswith("data: ")
    assert len(slow.started) == 3  # the refused request never reached the engine


def test_refused_requests_release_their_slot(fake):
    app = create_app(fake, ServerConfig(max_concurrent_requests=1))
    with run_live(app) as url, httpx.Client(base_url=url) as http:
        for body in (chat(n=0), chat(model="nope"), chat(stream=True, temperature=9), chat()):
            http.post(URL, json=body)
        assert app.state.server.admission.in_flight == 0
        assert http.post(URL, json=chat()).status_code == 200
