"""OpenAI's error envelope and the exception handlers that guarantee every failure uses it.

Body: `{"error": {"message", "type", "param", "code"}}` with a string (or null) `code`. Statuses are
honest: a bad request is a 4xx, because OpenAI's SDKs retry 5xx and would triple the load. Messages
never carry internals (paths, addresses, library reprs): unexpected exceptions become a fixed 500
text and are logged.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlmdeploy.errors import EngineDeadError, InvalidRequestError

logger = logging.getLogger("vlmdeploy.serve")

# OpenAI answers 401 with type invalid_request_error (code invalid_api_key); SDKs key on that.
_TYPE_BY_STATUS = {429: "rate_limit_error", 500: "server_error", 503: "service_unavailable_error"}
_CODE_BY_STATUS = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large",
                   415: "unsupported_media_type", 431: "request_header_fields_too_large"}


def printable(text: str) -> str:
    """``text`` with any lone surrogate spelled out (``\\ud800``): a message or param may quote a
    request's own bad text, and the response must still encode as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class APIError(Exception):
    """An HTTP error answered in OpenAI's envelope."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = printable(message)
        self.code = code
        self.param = None if param is None else printable(param)
        self.headers = headers

    @property
    def type(self) -> str:
        return _TYPE_BY_STATUS.get(self.status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid(message: str, param: str | None = None,
            code: str | None = "invalid_request") -> APIError:
    return APIError(400, message, code=code, param=param)


def unavailable(message: str = "The engine is not available.") -> APIError:
    return APIError(503, message, code="service_unavailable", headers={"Retry-After": "5"})


def shutting_down() -> APIError:
    return APIError(503, "The server is shutting down; retry the request.",
                    code="server_shutting_down", headers={"Retry-After": "5"})


def server_error() -> APIError:
    return APIError(500, "The server had an error while processing your request.",
                    code="server_error")


def from_exception(exc: BaseException) -> APIError:
    """Map anything raised while serving a request to the envelope it is answered with."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidRequestError):
        return APIError(getattr(exc, "status", 400), exc.message, code=exc.code, param=exc.param)
    if isinstance(exc, EngineDeadError):
        return unavailable()
    logger.error("request failed", exc_info=exc)
    return server_error()


def _param_from_loc(loc: tuple[Any, ...]) -> str | None:
    param = ""
    for part in loc:
        if part == "body":
            continue
        param += f"[{part}]" if isinstance(part, int) else (f".{part}" if param else str(part))
    return param or None


def from_validation_errors(errors: list[dict[str, Any]]) -> APIError:
    """A pydantic error list -> 400 naming the first bad parameter (never FastAPI's 422)."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = _param_from_loc(tuple(first.get("loc", ())))
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return invalid(f"{param}: {msg}" if param else msg, param=param)


def install_handlers(app: FastAPI) -> None:
    """Route every error FastAPI or Starlette can produce through the envelope."""

    async def on_api_error(_: Request, exc: Exception) -> JSONResponse:
        return from_exception(exc).response()

    async def on_validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return from_validation_errors(list(exc.errors())).response()

    async def on_http(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        status = exc.status_code
        message = {404: "Not found.", 405: "Method not allowed."}.get(status, str(exc.detail))
        error = APIError(status, message, code=_CODE_BY_STATUS.get(status), headers=exc.headers)
        return error.response()

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(InvalidRequestError, on_api_error)
    app.add_exception_handler(EngineDeadError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_api_error)
