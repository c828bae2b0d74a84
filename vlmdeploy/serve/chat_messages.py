"""Validation of chat `messages`: roles, content and content parts, each error naming its exact

place.
The result is the normalized OpenAI-style list the pipeline's `prepare` takes: `developer` becomes
`system`, unknown message keys are dropped, and an image part keeps only `url`, `detail` and
`max_dynamic_patch`. Fetching and decoding images is not done here; `prepare` does it, before any
engine work.
"""

from __future__ import annotations

from typing import Any

from vlmdeploy.serve.errors import APIError, invalid

ROLES = ("system", "developer", "user", "assistant")
DETAILS = ("auto", "low", "medium", "high")
MAX_DYNAMIC_PATCH = 64


def _unsupported(kind: str, param: str) -> APIError:
    return invalid(f"Content part type {kind!r} is not supported; use 'text' or 'image_url'.",
                   param=param, code="unsupported_content_type")


def _text_part(part: dict[str, Any], param: str) -> dict[str, Any]:
    if not isinstance(part.get("text"), str):
        raise invalid(f"{param}.text must be a string.", param=f"{param}.text")
    return {"type": "text", "text": part["text"]}


def _image_part(part: dict[str, Any], param: str) -> dict[str, Any]:
    spec = part.get("image_url")
    if not isinstance(spec, dict):
        raise invalid(f"{param}.image_url must be an object with a 'url'.",
                      param=f"{param}.image_url")
    url = spec.get("url")
    if not isinstance(url, str) or not url:
        raise invalid(f"{param}.image_url.url must be a non-empty string.",
                      param=f"{param}.image_url.url", code="invalid_image_url")
    out: dict[str, Any] = {"url": url}
    detail = spec.get("detail")
    if detail is not None:
        if detail not in DETAILS:
            raise invalid(f"{param}.image_url.detail must be one of {', '.join(DETAILS)}.",
                          param=f"{param}.image_url.detail")
        out["detail"] = detail
    patches = spec.get("max_dynamic_patch")
    if patches is not None:
        if type(patches) is not int or not 1 <= patches <= MAX_DYNAMIC_PATCH:
            raise invalid(f"{param}.image_url.max_dynamic_patch must be an integer in "
                          f"1..{MAX_DYNAMIC_PATCH}.", param=f"{param}.image_url.max_dynamic_patch")
        out["max_dynamic_patch"] = patches
    return {"type": "image_url", "image_url": out}


def _part(part: Any, param: str, role: str) -> dict[str, Any]:
    if not isinstance(part, dict):
        raise invalid(f"{param} must be an object.", param=param)
    kind = part.get("type")
    if kind == "text":
        return _text_part(part, param)
    if kind == "image_url":
        if role != "user":
            raise invalid(f"{param}: images are only allowed in user messages.", param=param,
                          code="unsupported_content_type")
        return _image_part(part, param)
    if not isinstance(kind, str):
        raise invalid(f"{param}.type must be a string.", param=f"{param}.type")
    raise _unsupported(kind, f"{param}.type")


def _content(content: Any, param: str, role: str) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if content is None:
        raise invalid(f"{param} must not be null.", param=param)
    if not isinstance(content, list):
        raise invalid(f"{param} must be a string or a list of content parts.", param=param)
    if not content:
        raise invalid(f"{param} must not be empty.", param=param, code="empty_array")
    return [_part(part, f"{param}[{j}]", role) for j, part in enumerate(content)]


def _message(message: Any, param: str) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise invalid(f"{param} must be an object.", param=param)
    role = message.get("role")
    if role is None:
        raise invalid(f"{param}.role is required.", param=f"{param}.role")
    if role not in ROLES:
        raise invalid(f"{param}.role must be one of {', '.join(ROLES)}.", param=f"{param}.role",
                      code="invalid_value")
    content = _content(message.get("content"), f"{param}.content", role)
    return {"role": "system" if role == "developer" else role, "content": content}


def parse_messages(messages: list[Any], max_images: int) -> list[dict[str, Any]]:
    """Validate and normalize a chat request's messages (raises APIError 400). More than
    `max_images` images is refused here, before any of them is fetched or decoded."""
    if not messages:
        raise invalid("messages must not be empty.", param="messages", code="empty_array")
    parsed = [_message(m, f"messages[{i}]") for i, m in enumerate(messages)]
    images = sum(1 for m in parsed if isinstance(m["content"], list)
                 for part in m["content"] if part["type"] == "image_url")
    if images > max_images:
        raise invalid(f"A request may carry at most {max_images} images; this one has {images}.",
                      param="messages", code="too_many_images")
    return parsed
