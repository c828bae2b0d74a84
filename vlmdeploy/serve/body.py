"""Reading a request body as one JSON object, with every size and time bounded.

The size cap is enforced while the body streams in (a declared `Content-Length` over the cap is
refused before reading a byte), so a 10 GB upload costs at most the cap in memory; the body is
gathered in one buffer that the JSON parser reads as it is, never copied. A slow sender is cut off
after `timeout_s`, or when the shutdown grace runs out. JSON is strict: `NaN`/`Infinity` are
refused and absurd nesting is a 400, not a 500. How many bytes a request sent is kept with it
(`body_bytes`), so the memory of a large refused request can be handed back.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.requests import ClientDisconnect, Request

from vlmdeploy.serve.errors import APIError, invalid, shutting_down
from vlmdeploy.serve.shutdown import Closing
from vlmdeploy.serve.streaming import task_result


def _too_large(limit: int) -> APIError:
    return APIError(413, f"The request body exceeds the limit of {limit} bytes.",
                    code="request_too_large", param="body")


def _check_content_type(request: Request) -> None:
    ctype = request.headers.get("content-type")
    if ctype is None:
        return  # curl without -H still sends JSON; absent means "untyped", not "form"
    media = ctype.split(";", 1)[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise APIError(415, "Content-Type must be application/json.", code="unsupported_media_type")


def body_bytes(request: Request) -> int:
    """How many body bytes `read_json_object` took in for this request (0 if none)."""
    return getattr(request.state, "body_bytes", 0)


async def _read_capped(request: Request, limit: int) -> bytearray:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    buffer = bytearray()
    try:
        async for chunk in request.stream():
            if len(buffer) + len(chunk) > limit:
                raise _too_large(limit)
            buffer += chunk
    finally:
        request.state.body_bytes = len(buffer)
    return buffer


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_object(raw: bytes | bytearray) -> dict[str, Any]:
    """Strict JSON parse of a request body that must be an object."""
    if not raw.strip():
        raise invalid("The request body is empty; expected a JSON object.", code="invalid_json")
    try:
        value = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise invalid("The request body is nested too deeply.", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError):
        raise invalid("The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(value, dict):
        raise invalid("The request body must be a JSON object.", code="invalid_json")
    return value


async def read_json_object(request: Request, limit: int, timeout_s: float,
                           closing: Closing | None = None) -> dict[str, Any]:
    """Read, bound and parse the body of `request`."""
    _check_content_type(request)
    reading = asyncio.ensure_future(_read_capped(request, limit))
    watchers = [asyncio.ensure_future(closing.wait())] if closing is not None else []
    try:
        await asyncio.wait({reading, *watchers}, timeout=timeout_s,
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (reading, *watchers):
            task.cancel()
        await asyncio.gather(reading, *watchers, return_exceptions=True)
    if reading.cancelled():
        if closing is not None and closing.is_set():
            raise shutting_down()
        raise APIError(408, "Timed out reading the request body.", code="request_timeout")
    try:
        raw = task_result(reading)
    except ClientDisconnect:
        raise APIError(400, "The client disconnected.", code="client_disconnected") from None
    del reading  # the buffer's only owner is now `raw`: it goes as soon as the parse is done
    return parse_json_object(raw)
