"""Tool calls out of a model's text (`--tool-call-parser`), streamed or whole.

Two formats:

* **`<tool_call>` JSON** (InternVL3.5 and Qwen3; LMDeploy's `qwen`, `qwen2d5`, `qwen3`, vLLM's
  `hermes`): each call is `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`; text
  outside the blocks is the answer's content.
* **Harmony** (GPT-OSS; `gpt-oss`, vLLM's `openai`): messages `<|channel|>C[ to=R]...<|message|>
  BODY` ended by `<|end|>`, `<|call|>` or `<|return|>`. The `analysis` channel is reasoning, a
  message to `functions.NAME` is a call whose body is its arguments, any other is content. The
  markers are special tokens, so requests parsed this way are decoded with
  `skip_special_tokens=False`.

Each parser is fed the text deltas of one choice and returns what is now certain
(:class:`Parsed`): text that may still turn out to start a marker is held back, and a call is
reported whole once its block has ended, so a call's arguments are never split by a block that
later fails to parse. A block whose JSON does not parse is returned as content, markers and all:
nothing the model wrote is dropped. When calls were made, the whitespace around the blocks is not
content.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from vlmdeploy.serve.reasoning import ReasoningSplitter, partial_suffix

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (OpenAI's shape)
    id: str = field(default_factory=new_call_id)

    def openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Parsed:
    reasoning: str = ""
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)

    def add(self, other: Parsed) -> Parsed:
        self.reasoning += other.reasoning
        self.content += other.content
        self.calls += other.calls
        return self


class ToolParser(Protocol):
    handles_reasoning: bool  # True: it also splits reasoning (harmony); no <think> splitter then

    def feed(self, text: str) -> Parsed: ...

    def flush(self) -> Parsed: ...


def _arguments(value: Any) -> str | None:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else None


def parse_call(body: str) -> ToolCall | None:
    """`{"name": ..., "arguments": {...}}` → a call, or None if it is not one."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = _arguments(obj.get("arguments", obj.get("parameters", {})))
    return None if args is None else ToolCall(obj["name"], args)


class _Whitespace:
    """Holds back trailing whitespace of content: around tool-call blocks it is not content."""

    def __init__(self) -> None:
        self.held = ""
        self.called = False

    def emit(self, text: str) -> str:
        text = self.held + text
        body = text.rstrip()
        self.held = text[len(body):]
        if self.called and not body.strip():
            return ""
        return body

    def block(self) -> None:  # a call was made: the whitespace before it goes
        self.held, self.called = "", True

    def flush(self) -> str:
        rest, self.held = self.held, ""
        return "" if self.called else rest


class JsonToolParser:
    """`<tool_call>{json}</tool_call>` blocks (Qwen3, InternVL3.5)."""

    handles_reasoning = False

    def __init__(self) -> None:
        self._buf = ""
        self._in_call = False
        self._ws = _Whitespace()
        self._strip_next = False

    def feed(self, text: str) -> Parsed:
        self._buf += text
        out = Parsed()
        while self._buf:
            if self._in_call:
                end = self._buf.find(CALL_CLOSE)
                if end < 0:
                    break
                self._close(self._buf[:end], out, closed=True)
                self._buf = self._buf[end + len(CALL_CLOSE):]
                continue
            if self._strip_next:
                self._buf = self._buf.lstrip()
                if not self._buf:
                    break
                self._strip_next = False
            start = self._buf.find(CALL_OPEN)
            if start >= 0:
                out.content += self._ws.emit(self._buf[:start])
                self._buf = self._buf[start + len(CALL_OPEN):]
                self._in_call = True
                continue
            keep = partial_suffix(self._buf, CALL_OPEN)
            out.content += self._ws.emit(self._buf[:len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep:]
            break
        return out

    def flush(self) -> Parsed:
        out = Parsed()
        if self._in_call:  # the text ended inside a block (a stop token ended it, or a limit)
            self._close(self._buf, out, closed=False)
        elif self._buf:
            out.content += self._ws.emit(self._buf)
        self._buf = ""
        out.content += self._ws.flush()
        return out

    def _close(self, body: str, out: Parsed, closed: bool) -> None:
        self._in_call = False
        call = parse_call(body.strip())
        if call is None:  # not a call after all: the model's text, as written
            raw = CALL_OPEN + body + (CALL_CLOSE if closed else "")
            out.content += self._ws.emit(raw)
            return
        self._ws.block()
        out.calls.append(call)
        self._strip_next = True


# ---- Harmony (GPT-OSS) -------------------------------------------------------------------------

_START, _MESSAGE, _CHANNEL = "<|start|>", "<|message|>", "<|channel|>"
_ENDS = ("<|end|>", "<|call|>", "<|return|>", _START)
_RECIPIENT = re.compile(r"\bto=([^\s<]+)")


class HarmonyToolParser:
    """GPT-OSS's harmony messages: reasoning, content and calls."""

    handles_reasoning = True

    def __init__(self) -> None:
        self._buf = ""
        self._header: str | None = ""  # None while inside a message body
        self._channel = ""
        self._recipient: str | None = None
        self._body = ""  # a call's arguments, gathered until the message ends
        self._seen_message = False

    def feed(self, text: str) -> Parsed:
        self._buf += text
        out = Parsed()
        while self._buf:
            if self._header is not None:
                idx = self._buf.find(_MESSAGE)
                if idx < 0:
                    break
                self._open(self._header + self._buf[:idx])
                self._buf = self._buf[idx + len(_MESSAGE):]
                continue
            idx, end = min(((self._buf.find(e), e) for e in _ENDS if e in self._buf),
                           default=(-1, ""))
            if idx >= 0:
                self._route(self._buf[:idx], out)
                self._buf = self._buf[idx + len(end):]  # after <|start|>: the next header
                self._end(out)
                continue
            keep = max(partial_suffix(self._buf, e) for e in _ENDS)
            self._route(self._buf[:len(self._buf) - keep], out)
            self._buf = self._buf[len(self._buf) - keep:]
            break
        return out

    def flush(self) -> Parsed:
        out = Parsed()
        if self._header is None:  # the stop token (<|call|>, <|return|>) is not in the text
            self._route(self._buf, out)
            self._end(out)
        elif not self._seen_message:  # no harmony markers at all: plain text
            out.content += self._header + self._buf
        self._buf, self._header = "", ""
        return out

    def _open(self, header: str) -> None:
        self._header, self._seen_message = None, True
        channel = header.split(_CHANNEL, 1)[1] if _CHANNEL in header else ""
        self._channel = re.split(r"[\s<]", channel.strip(), maxsplit=1)[0]
        match = _RECIPIENT.search(header)
        self._recipient = match.group(1) if match else None
        self._body = ""

    def _route(self, text: str, out: Parsed) -> None:
        if self._header is not None:
            self._header += text
        elif self._recipient is not None:
            self._body += text
        elif self._channel == "analysis":
            out.reasoning += text
        else:
            out.content += text

    def _end(self, out: Parsed) -> None:
        if self._header is None and self._recipient is not None:
            name = self._recipient.removeprefix("functions.")
            args = _arguments(self._body.strip() or "{}")
            if args is not None:
                out.calls.append(ToolCall(name, args))
            else:
                out.content += self._body
        self._header, self._recipient, self._channel = "", None, ""


# LMDeploy's names (and vLLM's where they differ) → parser; the other names LMDeploy knows are
# formats of other model families, refused with a message (see `check_tool_parser`).
TOOL_PARSERS: dict[str, type] = {
    "qwen3": JsonToolParser,
    "qwen": JsonToolParser,
    "qwen2d5": JsonToolParser,
    "hermes": JsonToolParser,
    "gpt-oss": HarmonyToolParser,
    "openai": HarmonyToolParser,
}
OTHER_FAMILIES = ("qwen3coder", "internlm", "intern-s1", "llama3", "glm47", "kimi_k2", "kimi-k2",
                  "deepseek-v32", "deepseek-v4", "interns2-preview")


def check_tool_parser(name: str | None) -> None:
    if name is None or name in TOOL_PARSERS:
        return
    known = ", ".join(TOOL_PARSERS)
    if name in OTHER_FAMILIES:
        raise ValueError(
            f"--tool-call-parser {name}: that is another model family's tool-call format; "
            f"InternVL3.5 writes Qwen3's <tool_call> JSON (qwen3) or, for GPT-OSS, harmony "
            f"(gpt-oss). Choose one of: {known}")
    raise ValueError(f"unknown tool-call parser {name!r}; choose from {known}")


class ChoiceParser:
    """One choice's text → reasoning, content and tool calls, delta by delta.

    `prefix` is text the answer was made to start with (it is in the prompt, not in the output)
    and is parsed as if generated."""

    def __init__(self, splitter: ReasoningSplitter | None, tools: ToolParser | None,
                 prefix: str = ""):
        self.tools = tools
        self.splitter = None if (tools is not None and tools.handles_reasoning) or prefix \
            else splitter
        self.calls: list[ToolCall] = []
        self._pending = tools.feed(prefix) if tools is not None and prefix else Parsed()

    def feed(self, text: str, last: bool = False) -> Parsed:
        out, self._pending = self._pending, Parsed()
        if self.splitter is not None:
            reasoning, content = self.splitter.feed(text)
            if last:
                r, c = self.splitter.flush()
                reasoning, content = reasoning + r, content + c
            out.reasoning += reasoning
            text = content
        if self.tools is None:
            out.content += text
        else:
            out.add(self.tools.feed(text))
            if last:
                out.add(self.tools.flush())
        self.calls += out.calls
        return out

    def parse_all(self, text: str) -> Parsed:
        return self.feed(text, last=True)
