"""`tools` and `tool_choice` of a chat request: validation, what the prompt carries, and the check
of a forced call.

* `auto` (the default when tools are given): the tools are rendered into the prompt by the chat
  template (or in Qwen3's format, see :mod:`vlmdeploy.frontend.tools`), and the answer is parsed
  for calls by the server's `--tool-call-parser`. Without one, a request with tools is refused
  (400), as LMDeploy does: the calls would come back as unparsed text.
* `none`: the tools are left out of the prompt and the answer is not parsed.
* `required` and a named function: the answer is made to start with the opening of a call
  (`<tool_call>\\n{"name": "` for `required`; the whole head up to the arguments for a named
  function, whose tool alone is rendered), and with a `<tool_call>` parser the rest is
  constrained by a grammar (:func:`call_grammar`): a declared tool's name, arguments valid
  against its JSON schema, the closing tag. GPT-OSS's format is forced through the prompt only.
  If what comes back is still not a valid call (a grammar cut short by `max_tokens`, or the
  harmony format), the request fails with 422 `tool_call_not_produced` rather than pretending;
  a stream ends with that error event. `docs/tool_calls.md` says this for users.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from vlmdeploy.serve.errors import APIError, invalid
from vlmdeploy.serve.tool_parsers import (
    TOOL_PARSERS,
    HarmonyToolParser,
    ToolCall,
    ToolParser,
)

MAX_TOOLS = 128
_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools mean for its prompt and its answer."""

    tools: list[dict[str, Any]] | None  # rendered into the prompt
    parser: str | None  # parse the answer for calls with this parser
    prefix: str = ""  # the answer is made to start with this
    forced: str | None = None  # "required", or the function a call must name
    grammar: str | None = None  # what may follow the prefix (Lark), for a forced call
    names: frozenset[str] = frozenset()
    parallel: bool = True

    def new_parser(self) -> ToolParser | None:
        return None if self.parser is None else TOOL_PARSERS[self.parser]()

    @property
    def template_kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.tools:
            out["tools"] = self.tools
        if self.prefix:
            out["assistant_prefix"] = self.prefix
        return out

    @property
    def skip_special_tokens(self) -> bool | None:
        """Harmony's markers are special tokens: the parser must see them."""
        if self.parser is not None and TOOL_PARSERS[self.parser] is HarmonyToolParser:
            return False
        return None

    def check(self, calls: list[ToolCall]) -> list[ToolCall]:
        """The calls to report; raises 422 when a forced call was not produced."""
        if not self.parallel:
            calls = calls[:1]
        if self.forced is None:
            return calls
        wanted = self.names if self.forced == "required" else {self.forced}
        if not calls or any(c.name not in wanted for c in calls):
            what = ("a call of one of the tools" if self.forced == "required"
                    else f"a call of {self.forced!r}")
            raise APIError(422, f"tool_choice asked for {what}, and the model's answer holds "
                           "none (cut short by max_tokens, or a format enforced through the "
                           "prompt only). Retry with more max_tokens, or use tool_choice='auto'.",
                           code="tool_call_not_produced", param="tool_choice")
        return calls


def _tool(tool: Any, param: str) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise invalid(f"{param} must be an object with type 'function'.", param=f"{param}.type")
    fn = tool.get("function")
    if not isinstance(fn, dict):
        raise invalid(f"{param}.function must be an object.", param=f"{param}.function")
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise invalid(f"{param}.function.name must be 1-64 letters, digits, '_', '-', '.' or "
                      "':'.", param=f"{param}.function.name")
    if fn.get("description") is not None and not isinstance(fn["description"], str):
        raise invalid(f"{param}.function.description must be a string.",
                      param=f"{param}.function.description")
    if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
        raise invalid(f"{param}.function.parameters must be a JSON Schema object.",
                      param=f"{param}.function.parameters")
    return tool


def _choice(choice: Any, names: set[str]) -> str | None:
    """None (auto), 'none', 'required', or the named function."""
    if choice is None or choice == "auto":
        return None
    if choice in ("none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise invalid("tool_choice.function.name must be a string.",
                          param="tool_choice.function.name")
        if name not in names:
            raise invalid(f"tool_choice names {name!r}, which is not in tools.",
                          param="tool_choice.function.name")
        return name
    raise invalid("tool_choice must be 'none', 'auto', 'required' or "
                  "{'type': 'function', 'function': {'name': ...}}.", param="tool_choice")


def _prefix(parser: str, forced: str) -> str:
    harmony = TOOL_PARSERS[parser] is HarmonyToolParser
    if forced == "required":
        return "<|channel|>commentary to=functions." if harmony else '<tool_call>\n{"name": "'
    if harmony:
        return f"<|channel|>commentary to=functions.{forced} <|constrain|>json<|message|>"
    return f'<tool_call>\n{{"name": "{forced}", "arguments": '


def plan_tools(tools: list[Any] | None, tool_choice: Any, parallel: bool | None,
               parser: str | None, max_chars: int) -> ToolPlan:
    """Validate a request's tools (400 naming the bad element) and plan its prompt and parsing."""
    if tools is not None and not isinstance(tools, list):
        raise invalid("tools must be a list.", param="tools")
    tools = [_tool(t, f"tools[{i}]") for i, t in enumerate(tools or [])]
    if len(tools) > MAX_TOOLS:
        raise invalid(f"At most {MAX_TOOLS} tools are accepted.", param="tools")
    if tools and len(json.dumps(tools, ensure_ascii=False)) > max_chars:
        raise invalid(f"tools are over {max_chars} characters (max_prompt_chars).",
                      param="tools", code="context_length_exceeded")
    names = {t["function"]["name"] for t in tools}
    choice = _choice(tool_choice, names)
    if choice is not None and choice != "none" and not tools:
        raise invalid(f"tool_choice={tool_choice!r} requires tools.", param="tool_choice")
    if not tools or choice == "none":
        return ToolPlan(tools=None, parser=None)
    if parser is None:
        raise invalid("This server parses no tool calls; launch it with --tool-call-parser "
                      "(qwen3 for InternVL3.5) to use tools.", param="tools",
                      code="unsupported_parameter")
    if choice is None:
        return ToolPlan(tools=tools, parser=parser, names=frozenset(names),
                        parallel=parallel is not False)
    rendered = tools if choice == "required" else [
        t for t in tools if t["function"]["name"] == choice]
    harmony = TOOL_PARSERS[parser] is HarmonyToolParser
    return ToolPlan(tools=rendered, parser=parser, prefix=_prefix(parser, choice), forced=choice,
                    names=frozenset(names), parallel=parallel is not False,
                    grammar=None if harmony else call_grammar(rendered, choice))


def call_grammar(tools: list[dict[str, Any]], forced: str) -> str:
    """The Lark grammar (llguidance's dialect) of what follows :func:`_prefix` in a forced
    `<tool_call>`: for `required`, one declared tool's name and its arguments; for a named
    function, its arguments; then the closing of the call."""
    tail = json.dumps('}\n</tool_call>')
    rules, alternatives = [], []
    for i, tool in enumerate(tools):
        function = tool["function"]
        schema = function.get("parameters") or {"type": "object"}
        # compact JSON (the arguments' meaning is the same; no tokens spent on blanks)
        schema = {"x-guidance": {"whitespace_flexible": False}, **schema}
        rules.append(f"args_{i}: %json {json.dumps(schema)}")
        head = "" if forced != "required" else json.dumps(function["name"] + '", "arguments": ')
        alternatives.append(f"call_{i}")
        rules.append(f"call_{i}: {head} args_{i} {tail}")
    return "\n".join([f"start: {' | '.join(alternatives)}", *rules]) + "\n"
