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


class _NotJSON(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _NotJSON(name)


def _loads(text: str) -> Any:
    """Strict JSON of model output, or `_NotJSON`: `NaN`/`Infinity` are not JSON (a client's
    parser would refuse the arguments), and nesting too deep for Python's parser is not a call
    (a `RecursionError` would fail the whole response)."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise _NotJSON from None


def _arguments(value: Any) -> str | None:
    try:
        if isinstance(value, str):
            value = _loads(value)
        return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else None
    except (_NotJSON, RecursionError):
        return None


def parse_call(body: str) -> ToolCall | None:
    """`{"name": ..., "arguments": {...}}` → a call, or None if it is not one."""
    try:
        obj = _loads(body)
    except _NotJSON:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = _arguments(obj.get("arguments", obj.get("parameters", {})))
    return None if args is None else ToolCall(obj["name"], args)


class _Whitespace:
    """Holds back trailing whitespace of content: around tool-call blocks it is not content."""

    def __init__(self) -> None:
        self._held: list[str] = []  # pieces, joined once: a run of blanks costs linear time
        self.called = False

    def emit(self, text: str) -> str:
        body = text.rstrip()
        if not body:
            self._held.append(text)
            return ""
        held, self._held = "".join(self._held), [text[len(body):]]
        return held + body

    def block(self) -> None:  # a call was made: the whitespace before it goes
        self._held, self.called = [], True

    def flush(self) -> str:
        rest, self._held = "".join(self._held), []
        return "" if self.called else rest


class _Gather:
    """Text gathered until ``marker``, in time linear in its length however it is split: each
    piece is searched once, together with the marker's length - 1 characters before it, and the
    pieces are joined once (model output that opens a block and never closes it is the
    adversarial case)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker
        self._parts: list[str] = []
        self._tail = ""  # the gathered text's last len(marker) - 1 characters

    def feed(self, text: str) -> tuple[str, str] | None:
        """None while ``marker`` has not come; then (the text before it, the text after it), and
        the gatherer is empty again."""
        window = self._tail + text
        idx = window.find(self.marker)
        if idx < 0:
            self._parts.append(text)
            self._tail = window[max(0, len(window) - len(self.marker) + 1):]
            return None
        head = "".join(self._parts)
        before = head[: len(head) - len(self._tail)] + window[:idx]
        after = window[idx + len(self.marker):]
        self._parts, self._tail = [], ""
        return before, after

    def take(self) -> str:
        """Everything gathered (the marker never came); the gatherer is empty again."""
        text, self._parts, self._tail = "".join(self._parts), [], ""
        return text


class JsonToolParser:
    """`<tool_call>{json}</tool_call>` blocks (Qwen3, InternVL3.5)."""

    handles_reasoning = False

    def __init__(self) -> None:
        self._buf = ""  # outside a block: at most a partial CALL_OPEN
        self._in_call = False
        self._call = _Gather(CALL_CLOSE)  # inside a block: its body so far
        self._ws = _Whitespace()
        self._strip_next = False

    def feed(self, text: str) -> Parsed:
        out = Parsed()
        while True:
            if self._in_call:
                found = self._call.feed(text)
                if found is None:
                    return out
                body, text = found
                self._close(body, out, closed=True)
                continue
            text, self._buf = self._buf + text, ""
            if self._strip_next:
                text = text.lstrip()
                if not text:
                    return out
                self._strip_next = False
            start = text.find(CALL_OPEN)
            if start >= 0:
                out.content += self._ws.emit(text[:start])
                text = text[start + len(CALL_OPEN):]
                self._in_call = True
                continue
            keep = partial_suffix(text, CALL_OPEN)
            out.content += self._ws.emit(text[:len(text) - keep])
            self._buf = text[len(text) - keep:]
            return out

    def flush(self) -> Parsed:
        out = Parsed()
        if self._in_call:  # the text ended inside a block (a stop token ended it, or a limit)
            self._close(self._call.take(), out, closed=False)
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
        self._buf = ""  # in a body: at most a partial end marker
        self._in_header = True  # before a message's <|message|>
        self._header = _Gather(_MESSAGE)
        self._channel = ""
        self._recipient: str | None = None
        self._body: list[str] = []  # a call's arguments, gathered until the message ends
        self._seen_message = False

    def feed(self, text: str) -> Parsed:
        out = Parsed()
        while True:
            if self._in_header:
                found = self._header.feed(text)
                if found is None:
                    return out
                header, text = found
                self._open(header)
                continue
            text, self._buf = self._buf + text, ""
            idx, end = min(((text.find(e), e) for e in _ENDS if e in text), default=(-1, ""))
            if idx >= 0:
                self._route(text[:idx], out)
                text = text[idx + len(end):]  # after <|start|>: the next header
                self._end(out)
                continue
            keep = max(partial_suffix(text, e) for e in _ENDS)
            self._route(text[:len(text) - keep], out)
            self._buf = text[len(text) - keep:]
            return out

    def flush(self) -> Parsed:
        out = Parsed()
        if not self._in_header:  # the stop token (<|call|>, <|return|>) is not in the text
            self._route(self._buf, out)
            self._end(out)
        elif not self._seen_message:  # no harmony markers at all: plain text
            out.content += self._header.take()
        self._buf = ""
        self._header.take()
        return out

    def _open(self, header: str) -> None:
        self._in_header, self._seen_message = False, True
        channel = header.split(_CHANNEL, 1)[1] if _CHANNEL in header else ""
        self._channel = re.split(r"[\s<]", channel.strip(), maxsplit=1)[0]
        match = _RECIPIENT.search(header)
        self._recipient = match.group(1) if match else None
        self._body = []

    def _route(self, text: str, out: Parsed) -> None:
        if self._recipient is not None:
            self._body.append(text)
        elif self._channel == "analysis":
            out.reasoning += text
        else:
            out.content += text

    def _end(self, out: Parsed) -> None:
        if not self._in_header and self._recipient is not None:
            name = self._recipient.removeprefix("functions.")
            body = "".join(self._body)
            args = _arguments(body.strip() or "{}")
            if args is not None:
                out.calls.append(ToolCall(name, args))
            else:
                out.content += body
        self._in_header, self._recipient, self._channel, self._body = True, None, "", []


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
