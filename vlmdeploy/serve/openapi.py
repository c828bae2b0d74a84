"""The OpenAPI document at `/openapi.json` (and FastAPI's `/docs` page over it).

The generation routes read their bodies themselves (size caps, strict JSON, exact error params), so
FastAPI cannot infer their schemas; this module describes them from the same pydantic models that
validate requests (`vlmdeploy.serve.protocol`) and from the response models of
`vlmdeploy.serve.schemas`. Every error a route can answer is documented with OpenAI's envelope.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from vlmdeploy.serve.protocol import ChatCompletionRequest, CompletionRequest
from vlmdeploy.serve.schemas import RESPONSE_MODELS

DESCRIPTION = ("OpenAI-compatible chat and text completions for InternVL3.5 vision-language "
               "models. Errors use OpenAI's envelope; `stream: true` answers Server-Sent Events.")

_ERRORS = {
    "400": "Invalid request (also a prompt over the context length or max_prompt_chars)",
    "401": "Missing or wrong API key", "404": "Unknown model or route",
    "408": "The request body arrived too slowly", "413": "The request body is too large",
    "415": "The body is not JSON", "429": "Too many requests in flight",
    "500": "Internal error", "503": "The engine has failed or the server is shutting down",
}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _add_model(schemas: dict[str, Any], model: type[BaseModel]) -> None:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(schema.pop("$defs", {}))
    schemas[model.__name__] = schema


def _errors(*statuses: str) -> dict[str, Any]:
    error = {"content": {"application/json": {"schema": _ref("ErrorResponse")}}}
    out = {s: {"description": _ERRORS[s], **error} for s in statuses}
    out["default"] = {"description": "Any other error", **error}
    return out


def _event(chunk: str) -> dict[str, Any]:
    """One Server-Sent Event of a stream (OpenAPI before 3.2: `schema` describes an event)."""
    return {"type": "object", "required": ["data"], "properties": {
        "data": {"type": "string", "description": f"a {chunk} as JSON; after a failure an "
                 "ErrorResponse; last, `[DONE]`"},
        "event": {"type": "string"}}}


def _generation(operation: dict[str, Any], request: str, response: str, chunk: str) -> None:
    operation["requestBody"] = {
        "required": True, "content": {"application/json": {"schema": _ref(request)}}}
    operation["responses"] = {
        "200": {"description": "The completion, or with `stream: true` its chunks as "
                               "Server-Sent Events ending in `data: [DONE]`",
                "content": {"application/json": {"schema": _ref(response)},
                            "text/event-stream": {"schema": _event(chunk)}}},
        **_errors("400", "401", "404", "408", "413", "415", "429", "500", "503"),
    }


def build_openapi(app: FastAPI) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, description=DESCRIPTION,
                      routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for model in (ChatCompletionRequest, CompletionRequest, *RESPONSE_MODELS):
        _add_model(schemas, model)
    paths = doc["paths"]
    _generation(paths["/v1/chat/completions"]["post"], "ChatCompletionRequest", "ChatCompletion",
                "chat.completion.chunk")
    _generation(paths["/v1/completions"]["post"], "CompletionRequest", "Completion",
                "text_completion chunk")
    paths["/v1/models"]["get"]["responses"] = {
        "200": {"description": "The served model",
                "content": {"application/json": {"schema": _ref("ModelList")}}},
        **_errors("401")}
    retrieve = paths["/v1/models/{model}"]["get"]
    retrieve["parameters"] = [{"name": "model", "in": "path", "required": True,
                               "schema": {"type": "string"}}]
    retrieve["responses"] = {
        "200": {"description": "The model", "content": {"application/json": {
            "schema": _ref("ModelCard")}}},
        **_errors("401", "404")}
    paths["/health"]["get"]["responses"] = {
        "200": {"description": "The engine is serving (also for HEAD)",
                "content": {"application/json": {"schema": {"type": "object"}}}},
        **_errors("503")}
    paths["/metrics"]["get"]["responses"] = {
        "200": {"description": "Prometheus metrics (vLLM's series names)",
                "content": {"text/plain": {"schema": {"type": "string"}}}},
        **_errors("401")}
    return doc


def install_openapi(app: FastAPI) -> None:
    """Serve `build_openapi(app)` (built once, on first use) as the app's schema."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
