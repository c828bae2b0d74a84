"""`POST /v1/chat/completions`: text and image messages in, one answer per choice out, whole or as
Server-Sent Events (one chunk per generated token)."""

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
from vlmdeploy.serve.reasoning import ReasoningSplitter, split_all
from vlmdeploy.serve.sampling import check_chat_request, template_kwargs
from vlmdeploy.serve.state import ServerState
from vlmdeploy.serve.streaming import DONE, merge, sse


async def _parse(request: Request, state: ServerState) -> tuple[Any, list[Any], dict | None]:
    req = await read_request(request, state, ChatCompletionRequest, prompt_field="messages")
    check_chat_request(req, state.pipe.session_len)
    messages = parse_messages(req.messages, state.config.max_images_per_request)
    check_text(messages=messages, stop=req.stop)
    return req, [messages], template_kwargs(req.chat_template_kwargs)


def _enable_thinking(req: ChatCompletionRequest) -> bool | None:
    return (req.chat_template_kwargs or {}).get("enable_thinking")


def _body(state: ServerState, job: Job, results: list[ChoiceResult]) -> dict[str, Any]:
    req: ChatCompletionRequest = job.req
    choices = []
    for r in results:
        splitter = state.splitter(_enable_thinking(req))
        message: dict[str, Any] = {"role": "assistant", "content": r.text}
        if splitter is not None:
            message["reasoning_content"], message["content"] = split_all(splitter, r.text)
        logprobs = None
        if req.logprobs and r.logprobs is not None:
            logprobs = chat_logprobs(state.pipe.tokenizer, r.token_ids, r.logprobs,
                                     req.top_logprobs or 0)
        choice = {"index": r.index, "message": message, "logprobs": logprobs,
                  "finish_reason": r.finish_reason}
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
        self.splitters: list[ReasoningSplitter | None] = [
            state.splitter(_enable_thinking(self.req)) for _ in job.prepared]

    def frame(self, index: int, delta: dict[str, Any], finish: str | None = None,
              logprobs: Any = None, token_ids: list[int] | None = None) -> bytes:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        if token_ids is not None:
            choice["token_ids"] = token_ids
        return sse({**self.head, "choices": [choice], **self.tail})

    def frames(self, index: int, d: Delta) -> list[bytes]:
        reasoning, content = self._split(index, d.text, d.finish_reason is not None)
        delta: dict[str, Any] = {}
        if content:
            delta["content"] = content
        if reasoning:
            delta["reasoning_content"] = reasoning
        logprobs = None
        if self.req.logprobs and d.logprobs:
            logprobs = chat_logprobs(self.state.pipe.tokenizer, d.token_ids, d.logprobs,
                                     self.req.top_logprobs or 0)
        ids = d.token_ids if self.req.return_token_ids and d.token_ids else None
        out = [self.frame(index, delta, logprobs=logprobs, token_ids=ids)] if (
            delta or logprobs or ids) else []
        if d.finish_reason is not None:
            out.append(self.frame(index, {}, finish=d.finish_reason))
        return out

    def _split(self, index: int, text: str, last: bool) -> tuple[str, str]:
        splitter = self.splitters[index]
        if splitter is None:
            return "", text
        reasoning, content = splitter.feed(text)
        if last:
            r, c = splitter.flush()
            reasoning, content = reasoning + r, content + c
        return reasoning, content


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
