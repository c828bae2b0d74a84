"""`POST /v1/chat/completions`: text and image messages in, one answer per choice out, whole or as
Server-Sent Events (one chunk per generated token).

Each choice's text goes through a :class:`~vlmdeploy.serve.tool_parsers.ChoiceParser`: the
`<think>` split (`--reasoning-parser`; reported as `reasoning_content` and, for vLLM's clients,
`reasoning`) and, for requests with tools, the tool-call parser (`--tool-call-parser`;
:mod:`vlmdeploy.serve.tools`)."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from vlmdeploy.errors import EngineDeadError
from vlmdeploy.serve.chat_messages import parse_messages
from vlmdeploy.serve.errors import from_exception, shutting_down
from vlmdeploy.serve.generation import ChoiceResult, Delta
from vlmdeploy.serve.jobs import (
    Job,
    Route,
    check_text,
    choice_streams,
    handle,
    read_request,
    usage,
)
from vlmdeploy.serve.logprobs import chat_logprobs
from vlmdeploy.serve.protocol import ChatCompletionRequest
from vlmdeploy.serve.reasoning import HARMONY_PARSERS
from vlmdeploy.serve.sampling import check_chat_request, template_kwargs
from vlmdeploy.serve.state import ServerState
from vlmdeploy.serve.streaming import DONE, merge, sse
from vlmdeploy.serve.tool_parsers import ChoiceParser, HarmonyToolParser, ToolCall
from vlmdeploy.serve.tools import ToolPlan, plan_tools


async def _parse(request: Request, state: ServerState) -> tuple[Any, list[Any], dict | None]:
    req = await read_request(request, state, ChatCompletionRequest, prompt_field="messages")
    check_chat_request(req, state.pipe.session_len)
    plan = plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls,
                      state.config.tool_call_parser, state.max_prompt_chars)
    messages = parse_messages(req.messages, state.config.max_images_per_request)
    check_text(messages=messages, stop=req.stop, tools=plan.tools)
    req.tool_plan = plan
    if plan.skip_special_tokens is not None:
        req.skip_special_tokens = plan.skip_special_tokens
    if state.config.reasoning_parser in HARMONY_PARSERS:  # its channel markers are special
        req.skip_special_tokens = False
    kwargs = {**(template_kwargs(req.chat_template_kwargs) or {}), **plan.template_kwargs}
    return req, [messages], kwargs or None


def _enable_thinking(req: ChatCompletionRequest) -> bool | None:
    return (req.chat_template_kwargs or {}).get("enable_thinking")


def _choice_parser(state: ServerState, req: ChatCompletionRequest) -> ChoiceParser:
    plan: ToolPlan = req.tool_plan
    tools = plan.new_parser()
    if tools is None and state.config.reasoning_parser in HARMONY_PARSERS:
        tools = HarmonyToolParser()  # GPT-OSS: the analysis channel is the reasoning
    return ChoiceParser(state.splitter(_enable_thinking(req)), tools, plan.prefix)


def _reasoning_shown(state: ServerState, parser: ChoiceParser) -> bool:
    return parser.splitter is not None or (
        parser.tools is not None and parser.tools.handles_reasoning) or (
        state.config.reasoning_parser is not None)


def _finish(reason: str | None, calls: bool) -> str | None:
    return "tool_calls" if calls and reason == "stop" else reason


def _body(state: ServerState, job: Job, results: list[ChoiceResult]) -> dict[str, Any]:
    req: ChatCompletionRequest = job.req
    plan: ToolPlan = req.tool_plan
    choices = []
    for r in results:
        parser = _choice_parser(state, req)
        parsed = parser.parse_all(r.text)
        calls = plan.check(parsed.calls) if parser.tools is not None else []
        message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
        if _reasoning_shown(state, parser):
            message["reasoning_content"] = message["reasoning"] = parsed.reasoning or None
        if calls:
            message["content"] = parsed.content or None
            message["tool_calls"] = [c.openai() for c in calls]
        logprobs = None
        if req.logprobs and r.logprobs is not None:
            logprobs = chat_logprobs(state.pipe.tokenizer, r.token_ids, r.logprobs,
                                     req.top_logprobs or 0)
        choice = {"index": r.index, "message": message, "logprobs": logprobs,
                  "finish_reason": _finish(r.finish_reason, bool(calls))}
        if req.return_token_ids:
            choice["token_ids"] = r.token_ids
        choices.append(choice)
    return {"id": job.id, "object": "chat.completion", "created": job.created,
            "model": state.model_name, "choices": choices, "usage": usage(job, results)}


class _ChunkWriter:
    """Builds the SSE frames of one chat stream."""

    def __init__(self, state: ServerState, job: Job):
        self.state, self.req = state, job.req
        self.head = {"id": job.id, "object": "chat.completion.chunk", "created": job.created,
                     "model": state.model_name}
        self.tail = {"usage": None} if self.req.include_usage else {}
        self.plan: ToolPlan = self.req.tool_plan
        self.parsers = [_choice_parser(state, self.req) for _ in job.prepared]
        self.reasoning = [_reasoning_shown(state, p) for p in self.parsers]
        self.calls = [0] * len(job.prepared)

    def frame(self, index: int, delta: dict[str, Any], finish: str | None = None,
              logprobs: Any = None, token_ids: list[int] | None = None) -> bytes:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        if token_ids is not None:
            choice["token_ids"] = token_ids
        return sse({**self.head, "choices": [choice], **self.tail})

    def frames(self, index: int, d: Delta) -> list[bytes]:
        parser = self.parsers[index]
        parsed = parser.feed(d.text, last=d.finish_reason is not None)
        delta: dict[str, Any] = {}
        if parsed.content:
            delta["content"] = parsed.content
        if parsed.reasoning and self.reasoning[index]:
            delta["reasoning_content"] = delta["reasoning"] = parsed.reasoning
        calls = self._calls(index, parsed.calls)
        if d.finish_reason is not None and parser.tools is not None:
            self.plan.check(parser.calls)  # a forced call that did not come: an error event
        logprobs = None
        if self.req.logprobs and d.logprobs:
            logprobs = chat_logprobs(self.state.pipe.tokenizer, d.token_ids, d.logprobs,
                                     self.req.top_logprobs or 0)
        ids = d.token_ids if self.req.return_token_ids and d.token_ids else None
        out = [self.frame(index, delta, logprobs=logprobs, token_ids=ids)] if (
            delta or logprobs or ids) else []
        out += calls
        if d.finish_reason is not None:
            out.append(self.frame(index, {}, finish=_finish(d.finish_reason,
                                                            self.calls[index] > 0)))
        return out

    def _calls(self, index: int, calls: list[ToolCall]) -> list[bytes]:
        """Each call as OpenAI streams it: its id, type and name with empty arguments, then the
        arguments."""
        out = []
        for call in calls:
            if not self.plan.parallel and self.calls[index]:
                break
            n, self.calls[index] = self.calls[index], self.calls[index] + 1
            head = {"index": n, "id": call.id, "type": "function",
                    "function": {"name": call.name, "arguments": ""}}
            out.append(self.frame(index, {"tool_calls": [head]}))
            out.append(self.frame(index, {"tool_calls": [
                {"index": n, "function": {"arguments": call.arguments}}]}))
        return out


async def _events(state: ServerState, job: Job) -> AsyncGenerator[bytes, None]:
    writer = _ChunkWriter(state, job)
    results = job.results
    try:
        for index in range(len(job.prepared)):
            yield writer.frame(index, {"role": "assistant", "content": ""})
        async with aclosing(merge(choice_streams(state, job))) as events:
            async for index, delta in events:
                results[index].add(delta)
                for frame in writer.frames(index, delta):
                    yield frame
        if job.req.include_usage:
            yield sse({**writer.head, "choices": [], "usage": usage(job, results)})
    except Exception as exc:  # after the first byte, errors travel as an SSE error frame
        if isinstance(exc, EngineDeadError):
            state.mark_dead()
        yield sse(from_exception(exc).body())
    yield DONE


def _farewell(state: ServerState, job: Job) -> list[bytes]:
    writer = _ChunkWriter(state, job)
    ends = [writer.frame(r.index, {}, finish="abort") for r in job.results
            if r.finish_reason is None]
    return [*ends, sse(shutting_down().body()), DONE]


ROUTE = Route(parse=_parse, events=_events, body=_body, farewell=_farewell, id_prefix="chatcmpl")


async def create_chat_completion(request: Request) -> Response:
    return await handle(request, ROUTE)
