"""Tools in the prompt: Qwen3's tool format, for chat templates that do not render tools
themselves.

InternVL3.5's language models are Qwen3, trained to see the tools in the system prompt, inside
``<tools></tools>``, one JSON object a line, and to answer
``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``. A checkpoint whose chat template
handles ``tools`` (its source names them) renders them itself; for any other template (the
embedded model's, plain ChatML) :func:`inline_tools` writes the same text into the messages before
the template runs, so the model sees the same prompt either way:

* the tool block is appended to the first system message (one is added when there is none);
* an assistant message's ``tool_calls`` become ``<tool_call>`` blocks after its text;
* a run of ``tool`` messages becomes one user message of ``<tool_response>`` blocks.

``tests/frontend/test_tools_prompt.py`` checks the result against a Qwen3-style template rendered
by transformers.
"""

from __future__ import annotations

import json
from typing import Any

TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"


def template_renders_tools(source: str | None) -> bool:
    """Whether a chat template handles ``tools`` itself (Qwen3's, GPT-OSS's do)."""
    return bool(source) and "tools" in source


def tools_block(tools: list[dict[str, Any]]) -> str:
    """The system prompt's tool section, one tool (as the client sent it) a line."""
    lines = "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools)
    return TOOLS_HEADER + lines + TOOLS_FOOTER


def call_text(name: str, arguments: Any) -> str:
    """One call as the model writes it; ``arguments`` as given (OpenAI sends a JSON string)."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return f'{CALL_OPEN}\n{{"name": "{name}", "arguments": {args}}}\n{CALL_CLOSE}'


def _assistant_text(message: dict[str, Any]) -> str:
    text = message.get("content") or ""
    for i, call in enumerate(message.get("tool_calls") or []):
        fn = call.get("function", call)
        if text or i:
            text += "\n"
        text += call_text(fn.get("name", ""), fn.get("arguments", {}))
    return text


def inline_tools(messages: list[dict[str, Any]],
                 tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """``messages`` (string contents) with tools, tool calls and tool results written as text, in
    Qwen3's format, for a template that only knows roles and contents."""
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message["role"]
        if role == "tool":
            response = f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"
            if out and out[-1].get("_tool_run"):
                out[-1]["content"] += "\n" + response
            else:
                out.append({"role": "user", "content": response, "_tool_run": True})
        elif role == "assistant" and message.get("tool_calls"):
            out.append({"role": "assistant", "content": _assistant_text(message)})
        else:
            out.append({"role": role, "content": message.get("content") or ""})
    out = [{"role": m["role"], "content": m["content"]} for m in out]
    if tools:
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + tools_block(tools)}
        else:
            out.insert(0, {"role": "system", "content": tools_block(tools)})
    return out
