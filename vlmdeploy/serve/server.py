"""Running the app under uvicorn, shutting down without cutting clients off, and failing fast when
the engine dies.

`serve(pipe, config, media_policy)` blocks until SIGINT/SIGTERM or until the engine fails; it
returns the process exit code (1 when the engine died), so a supervisor restarts a broken server
instead of finding it hung behind a healthy-looking socket. On a signal, requests in flight get
`shutdown_timeout` seconds to finish, then end with proper errors (`vlmdeploy.serve.shutdown`).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

import uvicorn

from vlmdeploy.serve.app import create_app
from vlmdeploy.serve.config import ServerConfig
from vlmdeploy.serve.contract import ServedPipeline
from vlmdeploy.serve.http import MAX_HEADER_BYTES, header_deadline_protocol
from vlmdeploy.serve.shutdown import SHUTDOWN_MARGIN_S

logger = logging.getLogger("vlmdeploy.serve")


# Python's level aliases that uvicorn does not know
_UVICORN_LEVEL = {"FATAL": "critical", "WARN": "warning", "NOTSET": "debug"}


def ssl_files(config: ServerConfig) -> dict[str, str]:
    """`--ssl`: the key and certificate files named by SSL_KEYFILE and SSL_CERTFILE (LMDeploy's
    variables)."""
    if not config.ssl:
        return {}
    files = {name: os.environ.get(var) for name, var in
             (("ssl_keyfile", "SSL_KEYFILE"), ("ssl_certfile", "SSL_CERTFILE"))}
    missing = [var for var, value in zip(("SSL_KEYFILE", "SSL_CERTFILE"), files.values())
               if not value]
    if missing:
        raise ValueError(f"--ssl needs the environment variables {' and '.join(missing)}")
    return files  # type: ignore[return-value]


def uvicorn_config(app: Any, config: ServerConfig, port: int | None = None) -> uvicorn.Config:
    protocol = header_deadline_protocol(config.header_timeout_s, config.max_connections,
                                        config.max_connections_per_client)
    return uvicorn.Config(
        app, host=config.server_name, port=config.server_port if port is None else port,
        http=protocol, ws="none", lifespan="on", log_level=_UVICORN_LEVEL.get(
            config.log_level, config.log_level.lower()),
        timeout_keep_alive=5, access_log=False, h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        timeout_graceful_shutdown=config.shutdown_timeout + SHUTDOWN_MARGIN_S,
        **ssl_files(config))


class _Server(uvicorn.Server):
    """uvicorn, telling the app when shutdown begins so that it drains, then ends what is left
    with proper errors before uvicorn's own limit cancels it."""

    def __init__(self, config: uvicorn.Config, on_shutdown: Callable[[], None] | None):
        super().__init__(config)
        self._on_shutdown = on_shutdown

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self._on_shutdown is not None:
            self._on_shutdown()
        await super().shutdown(sockets)


def make_server(app: Any, config: ServerConfig, port: int | None = None) -> uvicorn.Server:
    """The uvicorn server for `app` (from `create_app`) with the production settings of
    `config`."""
    state = getattr(getattr(app, "state", None), "server", None)
    return _Server(uvicorn_config(app, config, port),
                   None if state is None else state.begin_shutdown)


def is_loopback(host: str) -> bool:
    """Whether binding `host` exposes the server to this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def warn_if_exposed(config: ServerConfig) -> None:
    if not config.api_keys and not is_loopback(config.server_name):
        logger.warning(
            "listening on %s without API keys: anyone who can reach this address can use the "
            "server; pass --api-keys, or --server-name 127.0.0.1 to serve this machine only",
            config.server_name)


def serve(pipe: ServedPipeline, config: ServerConfig, media_policy: Any = None) -> int:
    died = False
    server: uvicorn.Server | None = None

    def on_engine_dead() -> None:
        nonlocal died
        died = True
        if server is not None:
            server.should_exit = True

    app = create_app(pipe, config, media_policy=media_policy, on_engine_dead=on_engine_dead)
    server = make_server(app, config)
    warn_if_exposed(config)
    server.run()
    if died:
        logger.critical("exiting: the engine failed")
        return 1
    return 0
