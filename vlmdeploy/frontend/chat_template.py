"""The checkpoint's Jinja chat template, rendered in a sandbox as transformers renders it.

The template (ChatML when the checkpoint has none) turns a conversation into the model's prompt
text; image markers stay in the text for :mod:`vlmdeploy.frontend.prompt` to expand.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.sandbox

from vlmdeploy.errors import InvalidRequestError
from vlmdeploy.frontend.tools import inline_tools, template_renders_tools

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# InternVL3.5's system prompt that switches on thinking mode (from its model card).
THINKING_SYSTEM_PROMPT = (
    "You are an AI assistant that rigorously follows this response protocol:\n\n"
    "1. First, conduct a detailed analysis of the question. Consider different angles, "
    "potential solutions, and reason through the problem step-by-step. Enclose this entire "
    "thinking process within <think> and </think> tags.\n\n"
    "2. After the thinking section, provide a clear, concise, and accurate answer to the "
    "question.\n\n"
    "3. Ensure the thinking process is thorough but remains focused on the query at hand.\n\n"
    "4. The final answer should be standalone and not reference the thinking section."
)


class ChatTemplate:
    """Renders a conversation with the checkpoint's Jinja chat template, in a sandbox.

    The environment offers what transformers' ``apply_chat_template`` offers templates (loop
    controls, a ``tojson`` that does not HTML-escape, ``raise_exception``, ``strftime_now``, the
    tokenizer's special tokens such as ``bos_token``), so both render the same text.
    """

    def __init__(self, template: str | None, special_tokens: dict[str, str] | None = None,
                 variables: dict[str, Any] | None = None):
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = _raise_template_error
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = _tojson
        self.template = env.from_string(template or CHATML_TEMPLATE)
        self.special_tokens = {**(special_tokens or {}), **(variables or {})}
        self.renders_tools = template_renders_tools(template)

    def render(
        self,
        messages: list[dict[str, Any]],
        enable_thinking: bool | None = None,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        assistant_prefix: str | None = None,
    ) -> str:
        """``enable_thinking=True`` adds InternVL3.5's thinking system prompt (unless the
        conversation has a system message); like any template variable it reaches the template
        only when given. ``tools`` (OpenAI's function tools) reach a template that renders them;
        for any other, they and the conversation's tool calls and results are written into the
        messages in Qwen3's format (:mod:`vlmdeploy.frontend.tools`). ``assistant_prefix`` is
        text the answer is made to start with (after the generation prompt)."""
        if enable_thinking and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": THINKING_SYSTEM_PROMPT}, *messages]
        extra: dict[str, Any] = {} if enable_thinking is None else {
            "enable_thinking": enable_thinking}
        if self.renders_tools:
            if tools:
                extra["tools"] = tools
        elif tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
            messages = inline_tools(messages, tools)
        text = self.template.render(
            **self.special_tokens,
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            **extra,
        )
        if assistant_prefix and add_generation_prompt:
            text += assistant_prefix
        return text


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_template_error(message: str) -> None:
    raise InvalidRequestError(
        f"chat template error: {message}", code="invalid_prompt", param="messages"
    )
