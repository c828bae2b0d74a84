"""Shutdown (RELIABILITY L10, L11) against a live uvicorn and a slow FakePipeline: while the grace
period (`shutdown_timeout`) runs, requests in flight go on and new ones get 503; when it ends,
every unfinished request ends with an OpenAI-shaped error (a 503 envelope, or for a stream an
`abort` chunk per unfinished choice, an error event and `data: [DONE]`), its engine requests are
aborted, and the server exits. The same on a real process with the real model:
test_reliability_process.py."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fake_pipeline import FakePipeline
from fastapi.testclient import TestClient
from serve_helpers import Live, assert_error, chat, live_server

from vlmdeploy.serve import ServerConfig, create_app
from vlmdeploy.serve.server import uvicorn_config
from vlmdeploy.serve.shutdown import SHUTDOWN_MARGIN_S

URL = "/v1/chat/completions"
LONG = {"max_tokens": 100_000, "ignore_eos": True}


def in_background(fn: Callable[[], Any]) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except httpx.HTTPError as exc:
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def stream_lines(url: str, path: str, body: dict, started: threading.Event) -> list[str]:
    with httpx.Client(base_url=url, timeout=30) as http, \
            http.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        lines = []
        for line in response.iter_lines():
            if line:
                lines.append(line)
                started.set()
        return lines


def events(lines: list[str]) -> list[Any]:
    return [line.removeprefix("data: ") if line == "data: [DONE]" else
            json.loads(line.removeprefix("data: ")) for line in lines]


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def start(grace: float, delay: float = 0.01) -> tuple[FakePipeline, Any, Any]:
    fake = FakePipeline(token_delay=delay, session_len=1_000_000)
    config = ServerConfig(shutdown_timeout=grace)
    app = create_app(fake, config)
    return fake, app, live_server(app, config)


def test_l11_grace_over_ends_every_request_with_an_openai_error():
    fake, app, server = start(grace=0.5)
    with server as live:
        live: Live
        started = [threading.Event() for _ in range(2)]
        chat_stream, chat_out = in_background(lambda: stream_lines(
            live.url, URL, chat("go", n=2, **LONG), started[0]))
        text_stream, text_out = in_background(lambda: stream_lines(
            live.url, "/v1/completions", {"prompt": "go", **LONG}, started[1]))
        whole, whole_out = in_background(lambda: httpx.post(
            live.url + URL, json=chat("go", **LONG), timeout=30))
        assert all(e.wait(10) for e in started)
        wait_for(lambda: len(fake.live) == 4)
        shutdown_at = time.monotonic()
        live.shut_down()
        for thread in (chat_stream, text_stream, whole):
            thread.join(10)
        took = time.monotonic() - shutdown_at
        live.thread.join(10)
        assert not live.thread.is_alive()  # the server has exited
    assert 0.4 < took < 0.5 + SHUTDOWN_MARGIN_S, took

    error = assert_error(whole_out["value"], 503, "server_shutting_down")
    assert error["type"] == "service_unavailable_error"
    for out, choices in ((chat_out, 2), (text_out, 1)):
        frames = events(out["value"])
        assert frames[-1] == "[DONE]"
        assert frames[-2] == {"error": {"message": error["message"], "code": "server_shutting_down",
                                        "type": "service_unavailable_error", "param": None}}
        ends = [c for f in frames[:-2] for c in f.get("choices", []) if c["finish_reason"]]
        assert sorted(c["index"] for c in ends) == list(range(choices))
        assert {c["finish_reason"] for c in ends} == {"abort"}
    assert sorted(fake.aborted) == sorted(fake.started) and not fake.live
    assert app.state.server.admission.in_flight == 0


def test_l10_requests_that_finish_within_the_grace_are_served():
    fake, app, server = start(grace=10.0, delay=0.01)
    with server as live:
        started = threading.Event()
        stream, out = in_background(lambda: stream_lines(
            live.url, URL, chat("go", max_tokens=60, ignore_eos=True), started))
        whole, whole_out = in_background(lambda: httpx.post(
            live.url + URL, json=chat("go", max_tokens=60, ignore_eos=True), timeout=30))
        assert started.wait(10)
        wait_for(lambda: len(fake.live) == 2)
        live.shut_down()
        stream.join(10)
        whole.join(10)
        live.thread.join(10)
    frames = events(out["value"])
    assert frames[-1] == "[DONE]" and all("error" not in f for f in frames[:-1])
    assert [c["finish_reason"] for f in frames[:-1] for c in f["choices"]
            if c["finish_reason"]] == ["length"]
    assert whole_out["value"].status_code == 200
    assert whole_out["value"].json()["usage"]["completion_tokens"] == 60


def test_l10_while_draining_health_and_new_requests_are_503():
    fake, app, server = start(grace=10.0, delay=0.02)
    with server as live, httpx.Client(base_url=live.url, timeout=10) as kept_alive:
        assert kept_alive.get("/health").status_code == 200  # opens the kept-alive connection
        started = threading.Event()
        stream, _ = in_background(lambda: stream_lines(
            live.url, URL, chat("go", max_tokens=100, ignore_eos=True), started))
        assert started.wait(10)
        live.shut_down()
        wait_for(lambda: app.state.server.draining)
        state = app.state.server
        assert state.draining and not state.closing.is_set()
        # the listener is closed and idle connections too; the app itself answers 503 while it
        # drains, as a kept-alive connection with a request in progress would see it
        with pytest.raises(httpx.HTTPError):
            httpx.get(live.url + "/health", timeout=2)
        stream.join(10)
    client = TestClient(app)
    assert_error(client.get("/health"), 503, "server_shutting_down")
    assert client.head("/health").status_code == 503
    assert_error(client.post(URL, json=chat("late")), 503, "server_shutting_down")
    assert len(fake.started) == 1


def test_shutdown_timeout_reaches_uvicorn_with_a_margin():
    config = ServerConfig(shutdown_timeout=7.0)
    assert uvicorn_config(object(), config).timeout_graceful_shutdown == 7.0 + SHUTDOWN_MARGIN_S
    with pytest.raises(ValueError, match="shutdown_timeout"):
        ServerConfig(shutdown_timeout=-1)
