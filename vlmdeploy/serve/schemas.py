"""Response schemas and the chat message schema, as published in `/openapi.json`.

The routes build their JSON by hand (one dict per response, no model validation on the hot path);
these models describe exactly what they send, so clients, gateways and schema-based testers see
the real shapes. `tests/serve/test_serve_openapi.py` checks real responses against them.
`MESSAGES_SCHEMA` documents `messages`, which `vlmdeploy.serve.chat_messages` validates by hand to
name the exact bad element in `param`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(_Strict):
    message: str
    type: Literal["invalid_request_error", "rate_limit_error", "server_error",
                  "service_unavailable_error"]
    param: str | None
    code: str | None


class ErrorResponse(_Strict):
    """Every error, whatever its status: OpenAI's envelope."""

    error: ErrorDetail


class ModelCard(_Strict):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    max_model_len: int


class ModelList(_Strict):
    object: Literal["list"]
    data: list[ModelCard]


class PromptTokensDetails(_Strict):
    cached_tokens: int


class Usage(_Strict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(_Strict):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Strict):
    content: list[TokenLogprob]


class FunctionCall(_Strict):
    name: str
    arguments: str = Field(description="a JSON object, as text")


class ToolCall(_Strict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(_Strict):
    role: Literal["assistant"]
    content: str | None = Field(description="null when the answer is only tool calls")
    reasoning_content: str | None = Field(None, description="with --reasoning-parser")
    reasoning: str | None = Field(None, description="the same as reasoning_content (vLLM's name)")
    tool_calls: list[ToolCall] | None = Field(None, description="with tools and "
                                              "--tool-call-parser")


FinishReason = Literal["stop", "length", "abort", "tool_calls"]


class ChatChoice(_Strict):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None
    token_ids: list[int] | None = Field(None, description="with return_token_ids")


class ChatCompletion(_Strict):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(_Strict):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(_Strict):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None
    token_ids: list[int] | None = Field(None, description="with return_token_ids")


class Completion(_Strict):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


RESPONSE_MODELS: tuple[type[BaseModel], ...] = (ErrorResponse, ModelList, ModelCard,
                                                ChatCompletion, Completion)

_TEXT = {"type": "string"}
_TEXT_PART = {
    "type": "object", "required": ["type", "text"],
    "properties": {"type": {"const": "text"}, "text": _TEXT},
}
_IMAGE_PART = {
    "type": "object", "required": ["type", "image_url"],
    "properties": {
        "type": {"const": "image_url"},
        "image_url": {
            "type": "object", "required": ["url"],
            "properties": {
                "url": {"type": "string", "minLength": 1,
                        "description": "http(s) URL or data:image/...;base64 URL"},
                "detail": {"enum": ["auto", "low", "medium", "high"]},
                "max_dynamic_patch": {"type": "integer", "minimum": 1, "maximum": 64},
            },
        },
    },
}
_VIDEO_PART = {
    "type": "object", "required": ["type", "video_url"],
    "properties": {
        "type": {"const": "video_url"},
        "video_url": {
            "type": "object", "required": ["url"],
            "properties": {
                "url": {"type": "string", "minLength": 1,
                        "description": "http(s) URL or data:video/...;base64 URL (MP4, WebM, "
                                       "MKV, AVI)"},
                "num_frames": {"type": "integer", "minimum": 1,
                               "description": "frames sampled at segment midpoints (default "
                                              "and cap: the server's)"},
                "start": {"type": "number", "minimum": 0, "description": "clip start, seconds"},
                "end": {"type": "number", "minimum": 0, "description": "clip end, seconds"},
                "max_dynamic_patch": {"type": "integer", "minimum": 1, "maximum": 64,
                                      "description": "tiles per frame (default 1)"},
            },
        },
    },
}
_CONTENT: dict[str, Any] = {"anyOf": [
    _TEXT, {"type": "array", "minItems": 1,
            "items": {"anyOf": [_TEXT_PART, _IMAGE_PART, _VIDEO_PART]}}]}
_TOOL_CALLS = {"type": "array", "items": {
    "type": "object", "required": ["type", "function"],
    "properties": {"id": _TEXT, "type": {"const": "function"},
                   "function": {"type": "object", "required": ["name", "arguments"],
                                "properties": {"name": _TEXT, "arguments": _TEXT}}}}}
MESSAGES_SCHEMA: dict[str, Any] = {
    "type": "array", "minItems": 1,
    "items": {
        "type": "object", "required": ["role"],
        "properties": {"role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
                       "content": {"anyOf": [_CONTENT, {"type": "null"}]},
                       "tool_calls": _TOOL_CALLS, "tool_call_id": _TEXT},
        "description": "images and videos only in user messages; content is required but for an "
                       "assistant message with tool_calls",
    },
}
