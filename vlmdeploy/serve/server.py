"""Running the app under uvicorn, and failing fast when the engine dies.

`serve(pipe, config, media_policy)` blocks until SIGINT/SIGTERM or until the engine fails; it
returns the process exit code (1 when the engine died), so a supervisor restarts a broken server
instead of finding it hung behind a healthy-looking socket.
"""

from __future__ import annotations

import logging
from typing import Any

import uvicorn

from vlmdeploy.serve.app import create_app
from vlmdeploy.serve.config import ServerConfig
from vlmdeploy.serve.contract import ServedPipeline
from vlmdeploy.serve.http import header_deadline_protocol

logger = logging.getLogger("vlmdeploy.serve")


def uvicorn_config(app: Any, config: ServerConfig, port: int | None = None) -> uvicorn.Config:
    return uvicorn.Config(
        app, host=config.server_name, port=config.server_port if port is None else port,
        http=header_deadline_protocol(config.header_timeout_s), ws="none", lifespan="on",
        log_level=config.log_level.lower(), timeout_keep_alive=5, access_log=False,
        timeout_graceful_shutdown=30)


def serve(pipe: ServedPipeline, config: ServerConfig, media_policy: Any = None) -> int:
    died = False
    server: uvicorn.Server | None = None

    def on_engine_dead() -> None:
        nonlocal died
        died = True
        if server is not None:
            server.should_exit = True

    app = create_app(pipe, config, media_policy=media_policy, on_engine_dead=on_engine_dead)
    server = uvicorn.Server(uvicorn_config(app, config))
    server.run()
    if died:
        logger.critical("exiting: the engine failed")
        return 1
    return 0
