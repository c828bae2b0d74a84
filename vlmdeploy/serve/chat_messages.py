"""Validation of chat `messages`: roles, content and content parts, each error naming its exact
place.

The result is the normalized OpenAI-style list the pipeline's `prepare` takes: `developer` becomes
`system`, unknown message keys are dropped, and an image part keeps only `url`, `detail` and
`max_dynamic_patch`, a video part (`video_url`, the shape vLLM accepts) only `url`, `num_frames`,
`start`, `end` (seconds) and `max_dynamic_patch`. An assistant message keeps its `tool_calls` (its
content may then be null) and a `tool` message its `tool_call_id`, its content flattened to text.
Fetching and decoding images and videos is not done here; `prepare` does it, before any engine
work.
"""

from __future__ import annotations

import json
from typing import Any

from vlmdeploy.serve.errors import APIError, invalid

ROLES = ("system", "developer", "user", "assistant", "tool")
DETAILS = ("auto", "low", "medium", "high")
MAX_DYNAMIC_PATCH = 64
# Videos one request may carry; each is up to the server's --max-video-frames images.
MAX_VIDEOS_PER_REQUEST = 4


def _unsupported(kind: str, param: str) -> APIError:
    return invalid(f"Content part type {kind!r} is not supported; use 'text', 'image_url' or "
                   "'video_url'.",
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


def _video_part(part: dict[str, Any], param: str) -> dict[str, Any]:
    """A video: its URL and sampling options, types checked here, ranges by `prepare` (the frame
    cap is the server's media policy)."""
    spec = part.get("video_url")
    where = f"{param}.video_url"
    if not isinstance(spec, dict):
        raise invalid(f"{where} must be an object with a 'url'.", param=where)
    url = spec.get("url")
    if not isinstance(url, str) or not url:
        raise invalid(f"{where}.url must be a non-empty string.", param=f"{where}.url",
                      code="invalid_video_url")
    out: dict[str, Any] = {"url": url}
    for key in ("num_frames", "max_dynamic_patch"):
        value = spec.get(key)
        if value is not None:
            if type(value) is not int or value < 1:
                raise invalid(f"{where}.{key} must be a positive integer.", param=f"{where}.{key}")
            out[key] = value
    for key in ("start", "end"):
        value = spec.get(key)
        if value is not None:
            if type(value) not in (int, float) or not 0 <= value < float("inf"):
                raise invalid(f"{where}.{key} must be a number of seconds >= 0.",
                              param=f"{where}.{key}")
            out[key] = value
    return {"type": "video_url", "video_url": out}


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
    if kind == "video_url":
        if role != "user":
            raise invalid(f"{param}: videos are only allowed in user messages.", param=param,
                          code="unsupported_content_type")
        return _video_part(part, param)
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


def _tool_call(call: Any, param: str) -> dict[str, Any]:
    """An earlier assistant turn's call, as OpenAI shapes it (`arguments` a JSON string)."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise invalid(f"{param} must be {{'type': 'function', 'function': {{'name': ..., "
                      "'arguments': ...}}.", param=f"{param}.function")
    args = fn.get("arguments", "{}")
    if isinstance(args, dict):
        args = json.dumps(args, ensure_ascii=False)
    if not isinstance(args, str):
        raise invalid(f"{param}.function.arguments must be a JSON string.",
                      param=f"{param}.function.arguments")
    out = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def _text_only(content: str | list[dict[str, Any]]) -> str:
    return content if isinstance(content, str) else "".join(p["text"] for p in content)


def _message(message: Any, param: str) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise invalid(f"{param} must be an object.", param=param)
    role = message.get("role")
    if role is None:
        raise invalid(f"{param}.role is required.", param=f"{param}.role")
    if role not in ROLES:
        raise invalid(f"{param}.role must be one of {', '.join(ROLES)}.", param=f"{param}.role",
                      code="invalid_value")
    calls = message.get("tool_calls") if role == "assistant" else None
    if calls is not None:
        if not isinstance(calls, list):
            raise invalid(f"{param}.tool_calls must be a list.", param=f"{param}.tool_calls")
        calls = [_tool_call(c, f"{param}.tool_calls[{j}]") for j, c in enumerate(calls)]
    raw = message.get("content")
    if raw is None and calls:  # an assistant turn that only called tools
        raw = ""
    content = _content(raw, f"{param}.content", role)
    out: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": content}
    if calls:
        out["tool_calls"] = calls
    if role == "tool":
        out["content"] = _text_only(content)
        if isinstance(message.get("tool_call_id"), str):
            out["tool_call_id"] = message["tool_call_id"]
    return out


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
    videos = sum(1 for m in parsed if isinstance(m["content"], list)
                 for part in m["content"] if part["type"] == "video_url")
    if videos > MAX_VIDEOS_PER_REQUEST:
        raise invalid(f"A request may carry at most {MAX_VIDEOS_PER_REQUEST} videos; this one has "
                      f"{videos}.", param="messages", code="too_many_videos")
    return parsed
