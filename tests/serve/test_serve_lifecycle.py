"""Engine health and process lifetime: a dead engine turns /health to 503 even with no traffic,
and `serve()` then stops and returns a non-zero exit code (RELIABILITY L5's fail-fast)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from fake_pipeline import FakePipeline
from fastapi.testclient import TestClient
from serve_helpers import free_port

import vlmdeploy.serve.app as app_module
from vlmdeploy.serve import ServerConfig, create_app
from vlmdeploy.serve.server import serve


@pytest.fixture(autouse=True)
def fast_health_poll(monkeypatch):
    monkeypatch.setattr(app_module, "HEALTH_POLL_S", 0.05)


def test_idle_server_notices_a_dead_engine():
    fake, died = FakePipeline(), []
    with TestClient(create_app(fake, on_engine_dead=lambda: died.append(1))) as client:
        assert client.get("/health").status_code == 200
        fake.dead = True
        deadline = time.monotonic() + 5
        while not died:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert client.get("/health").status_code == 503
    assert died == [1]


def test_serve_exits_non_zero_when_the_engine_dies():
    fake, port, codes = FakePipeline(), free_port(), []
    config = ServerConfig(server_name="127.0.0.1", server_port=port, log_level="CRITICAL")
    thread = threading.Thread(target=lambda: codes.append(serve(fake, config)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                break
        except httpx.HTTPError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    fake.dead = True
    thread.join(timeout=10)
    assert codes == [1]


def test_serve_returns_zero_on_a_normal_shutdown(monkeypatch):
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda self: None)  # as if SIGTERM came at once
    assert serve(FakePipeline(), ServerConfig(server_port=free_port())) == 0
