"""Reading a request body as one JSON object, with every size and time bounded.

The size cap is enforced while the body streams in (a declared `Content-Length` over the cap is
refused before reading a byte), so a 10 GB upload costs at most the cap in memory. A slow sender is
cut off after `timeout_s`. JSON is strict: `NaN`/`Infinity` are refused and absurd nesting is a 400,
not a 500.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.requests import ClientDisconnect, Request

from vlmdeploy.serve.errors import APIError, invalid


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


async def _read_capped(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_object(raw: bytes) -> dict[str, Any]:
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


async def read_json_object(request: Request, limit: int, timeout_s: float) -> dict[str, Any]:
    """Read, bound and parse the body of `request`."""
    _check_content_type(request)
    try:
        raw = await asyncio.wait_for(_read_capped(request, limit), timeout_s)
    except TimeoutError:
        raise APIError(408, "Timed out reading the request body.", code="request_timeout") from None
    except ClientDisconnect:
        raise APIError(400, "The client disconnected.", code="client_disconnected") from None
    return parse_json_object(raw)
