"""The FastAPI application: routes, middleware and error handlers around one pipeline.

`create_app(pipe, config, media_policy)` needs only the pipeline contract
(:class:`~vlmdeploy.serve.contract.ServedPipeline`), so tests can drive it with a test double.

Middleware, outermost first: CORS (answers browser preflights, which carry no key), API key (before
routing, so no spelling of a path skips it), then the router. `/openapi.json` and `/docs` publish
the request and response schemas (`vlmdeploy.serve.openapi`); `/health` answers GET and HEAD (load
balancers probe with either), 503 once the engine has failed or shutdown has begun.
`--disable-fastapi-docs` and `--disable-metrics` (LMDeploy's flags) leave those routes out.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.requests import Request
from starlette.responses import Response

from vlmdeploy import __version__
from vlmdeploy.errors import EngineDeadError
from vlmdeploy.serve.auth import APIKeyMiddleware
from vlmdeploy.serve.chat import create_chat_completion
from vlmdeploy.serve.completions import create_completion
from vlmdeploy.serve.config import ServerConfig
from vlmdeploy.serve.contract import ServedPipeline
from vlmdeploy.serve.errors import install_handlers, shutting_down
from vlmdeploy.serve.metrics import ServerMetrics
from vlmdeploy.serve.openapi import install_openapi
from vlmdeploy.serve.state import Admission, ServerState, get_state
from vlmdeploy.vl.media import MediaPolicy
from vlmdeploy.vl.media_policy import VideoLimits

logger = logging.getLogger("vlmdeploy.serve")

HEALTH_POLL_S = 2.0


def _model_card(state: ServerState) -> dict[str, Any]:
    return {"id": state.model_name, "object": "model", "created": int(time.time()),
            "owned_by": "vlmdeploy", "root": state.model_name,
            "max_model_len": state.pipe.session_len}


async def list_models(request: Request) -> JSONResponse:
    return JSONResponse({"object": "list", "data": [_model_card(get_state(request))]})


async def retrieve_model(request: Request) -> JSONResponse:
    state = get_state(request)
    state.check_model(request.path_params["model"])
    return JSONResponse(_model_card(state))


def _engine_alive(state: ServerState) -> bool:
    if state.engine_dead:
        return False
    try:
        state.pipe.stats()
    except EngineDeadError:
        state.mark_dead()
        return False
    except Exception:
        logger.warning("engine stats failed", exc_info=True)
        return False
    return True


async def health(request: Request) -> Response:
    state = get_state(request)
    if not _engine_alive(state):
        return JSONResponse({"error": {"message": "The engine is not available.",
                                       "type": "service_unavailable_error", "param": None,
                                       "code": "service_unavailable"}},
                            status_code=503, headers={"Retry-After": "5"})
    if state.draining:
        return shutting_down().response()
    return JSONResponse({})


async def metrics(request: Request) -> Response:
    body = get_state(request).metrics.render()
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


async def _watch_engine(state: ServerState) -> None:
    """Notice a dead engine even when no request is running, so the process can fail fast."""
    while not state.engine_dead:
        await asyncio.sleep(HEALTH_POLL_S)
        _engine_alive(state)


def _lifespan(state: ServerState) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager]:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        watcher = asyncio.ensure_future(_watch_engine(state))
        try:
            yield
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
    return lifespan


def media_policy_for(config: ServerConfig) -> MediaPolicy:
    """Requests come from the network: no private hosts, and local files only under the directory
    the operator opted in with `--allowed-local-media-path`."""
    root = config.allowed_local_media_path
    domains = tuple(config.allowed_media_domains) if config.allowed_media_domains else None
    video = VideoLimits(default_frames=config.video_num_frames,
                        max_frames=config.max_video_frames)
    return MediaPolicy.server_default(allow_local_files=root is not None, local_root=root,
                                      allowed_domains=domains, video=video)


def _no_telemetry() -> dict[str, Any]:
    """FastAPI >= 0.16x traces every request and records validation failures through OpenTelemetry
    by default: a per-request cost, and a path by which request content could reach an exporter.
    Off where the option exists."""
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False,
                          "operation_spans": False, "auto_configure": False}}


def create_app(pipe: ServedPipeline, config: ServerConfig | None = None, media_policy: Any = None,
               on_engine_dead: Callable[[], None] | None = None) -> FastAPI:
    config = config or ServerConfig()
    media_policy = media_policy or media_policy_for(config)
    admission = Admission(config.max_concurrent_requests, config.max_queued_requests)

    def stats() -> dict[str, Any]:  # requests waiting for a server slot are waiting too
        out = dict(pipe.stats())
        out["num_waiting"] = out.get("num_waiting", 0) + admission.waiting
        return out

    state = ServerState(pipe=pipe, config=config, media_policy=media_policy,
                        metrics=ServerMetrics(pipe.model_name, stats),
                        admission=admission, on_engine_dead=on_engine_dead)
    docs = not config.disable_fastapi_docs
    app = FastAPI(title="vlmdeploy", version=__version__, docs_url="/docs" if docs else None,
                  redoc_url=None, openapi_url="/openapi.json" if docs else None,
                  lifespan=_lifespan(state), **_no_telemetry())
    app.state.server = state
    app.add_api_route("/v1/models", list_models, methods=["GET"], operation_id="listModels")
    app.add_api_route("/v1/models/{model:path}", retrieve_model, methods=["GET"],
                      operation_id="retrieveModel")
    app.add_api_route("/v1/chat/completions", create_chat_completion, methods=["POST"],
                      operation_id="createChatCompletion")
    app.add_api_route("/v1/completions", create_completion, methods=["POST"],
                      operation_id="createCompletion")
    app.add_api_route("/health", health, methods=["GET"], operation_id="health")
    app.add_api_route("/health", health, methods=["HEAD"], include_in_schema=False)
    if not config.disable_metrics:
        app.add_api_route("/metrics", metrics, methods=["GET"], operation_id="metrics")
    if docs:
        install_openapi(app)
    install_handlers(app)
    if config.api_keys:
        open_paths = ["/health"] if config.protect_metrics else ["/health", "/metrics"]
        app.add_middleware(APIKeyMiddleware, api_keys=list(config.api_keys),
                           open_paths=open_paths)
    if config.allow_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allow_origins),
                           allow_credentials=config.allow_credentials,
                           allow_methods=list(config.allow_methods),
                           allow_headers=list(config.allow_headers))
    return app
