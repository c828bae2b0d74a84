"""OpenAI-compatible HTTP server (`vlmdeploy serve api_server`).

`create_app(pipe, config, media_policy)` builds the FastAPI app around a pipeline; `server.serve`
runs it under uvicorn. Routes: `/v1/models`, `/v1/chat/completions`, `/v1/completions`, `/health`
(GET and HEAD), `/metrics`, and the API's description at `/openapi.json` and `/docs`. The web stack
is imported on first use, so `vlmdeploy chat` runs without it.
"""

from typing import Any

__all__ = ["ServerConfig", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from vlmdeploy.serve.app import create_app
        return create_app
    if name == "ServerConfig":
        from vlmdeploy.serve.config import ServerConfig
        return ServerConfig
    raise AttributeError(name)
