"""Helpers shared by the server tests (see conftest.py for the fixtures)."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn
from fastapi.testclient import TestClient

from vlmdeploy.serve import ServerConfig, create_app
from vlmdeploy.serve.server import make_server

REAL_SESSION_LEN = 2048


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Live:
    """A running server: its base URL, port, the uvicorn server and the thread that runs it."""

    url: str
    port: int
    server: uvicorn.Server
    thread: threading.Thread

    def shut_down(self) -> None:
        """What SIGTERM does: uvicorn's exit flag (the drain and the grace follow)."""
        self.server.should_exit = True


@contextlib.contextmanager
def live_server(app: Any, config: ServerConfig | None = None) -> Iterator[Live]:
    """Serve `app` with the production uvicorn settings (`server.make_server`, which drains and
    ends requests at shutdown) on 127.0.0.1; `config` supplies the transport settings."""
    config = config or ServerConfig()
    port = free_port()
    settings = ServerConfig(server_name="127.0.0.1", log_level="ERROR", **{
        f: getattr(config, f) for f in ("header_timeout_s", "body_timeout_s", "max_connections",
                                        "max_connections_per_client", "shutdown_timeout")})
    server = make_server(app, settings, port=port)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield Live(f"http://127.0.0.1:{port}", port, server, thread)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextlib.contextmanager
def run_live(app: Any, config: ServerConfig | None = None) -> Iterator[str]:
    """Serve `app` with the production uvicorn settings; yields the base URL."""
    with live_server(app, config) as live:
        yield live.url


def make_client(pipe: Any, **config: Any) -> TestClient:
    return TestClient(create_app(pipe, ServerConfig(**config)))


def chat(content: Any = "hi", **params: Any) -> dict[str, Any]:
    """A chat completion request body."""
    return {"messages": [{"role": "user", "content": content}], **params}


def assert_error(response: Any, status: int, code: str | None = None,
                 param: str | None | type[Ellipsis] = ...) -> dict[str, Any]:
    """The response is `status` in OpenAI's envelope (with `code` and `param` when given)."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["code"] is None or isinstance(error["code"], str)
    if code is not None:
        assert error["code"] == code, error
    if param is not ...:
        assert error["param"] == param, error
    return error
