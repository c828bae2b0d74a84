"""`POST /v1/completions`: raw text prompts (no chat template), whole or streamed.

Choice `i` of prompt `p` has index `p * n + i`, as in OpenAI's API.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from vlmdeploy.errors import EngineDeadError
from vlmdeploy.serve.errors import from_exception, shutting_down
from vlmdeploy.serve.generation import ChoiceResult
from vlmdeploy.serve.jobs import (
    Job,
    Route,
    check_text,
    choice_streams,
    handle,
    read_request,
    usage,
)
from vlmdeploy.serve.logprobs import completion_logprobs
from vlmdeploy.serve.protocol import CompletionRequest
from vlmdeploy.serve.sampling import check_completion_request
from vlmdeploy.serve.state import ServerState
from vlmdeploy.serve.streaming import DONE, merge, sse


async def _parse(request: Request, state: ServerState) -> tuple[Any, list[Any], dict | None]:
    req = await read_request(request, state, CompletionRequest, prompt_field="prompt")
    check_completion_request(req, state.pipe.session_len)
    check_text(prompt=req.prompt, stop=req.stop)
    return req, req.prompts, None


def _logprobs(state: ServerState, job: Job, token_ids: list[int], tables: Any,
              offset: int = 0) -> dict[str, Any] | None:
    if job.req.logprobs is None or not tables:
        return None
    return completion_logprobs(state.pipe.tokenizer, token_ids, tables, job.req.logprobs, offset)


def _body(state: ServerState, job: Job, results: list[ChoiceResult]) -> dict[str, Any]:
    choices = []
    for r in results:
        choice = {"index": r.index, "text": r.text, "finish_reason": r.finish_reason,
                  "logprobs": _logprobs(state, job, r.token_ids, r.logprobs)}
        if job.req.return_token_ids:
            choice["token_ids"] = r.token_ids
        choices.append(choice)
    return {"id": job.id, "object": "text_completion", "created": job.created,
            "model": state.model_name, "choices": choices, "usage": usage(job, results)}


def _frame(state: ServerState, job: Job, index: int, text: str, finish: str | None,
           logprobs: Any = None, token_ids: list[int] | None = None) -> bytes:
    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    tail = {"usage": None} if job.req.include_usage else {}
    return sse({**_head(state, job), "choices": [choice], **tail})


def _head(state: ServerState, job: Job) -> dict[str, Any]:
    return {"id": job.id, "object": "text_completion", "created": job.created,
            "model": state.model_name}


async def _events(state: ServerState, job: Job) -> AsyncGenerator[bytes, None]:
    head = _head(state, job)
    results = job.results

    def frame(index: int, text: str, finish: str | None, logprobs: Any = None,
              token_ids: list[int] | None = None) -> bytes:
        return _frame(state, job, index, text, finish, logprobs, token_ids)

    try:
        async with aclosing(merge(choice_streams(state, job))) as events:
            async for index, d in events:
                offset = len(results[index].text)
                results[index].add(d)
                logprobs = _logprobs(state, job, d.token_ids, d.logprobs, offset)
                ids = d.token_ids if job.req.return_token_ids and d.token_ids else None
                if d.text or logprobs or ids:
                    yield frame(index, d.text, None, logprobs, ids)
                if d.finish_reason is not None:
                    yield frame(index, "", d.finish_reason)
        if job.req.include_usage:
            yield sse({**head, "choices": [], "usage": usage(job, results)})
    except Exception as exc:  # after the first byte, errors travel as an SSE error frame
        if isinstance(exc, EngineDeadError):
            state.mark_dead()
        yield sse(from_exception(exc).body())
    yield DONE


def _farewell(state: ServerState, job: Job) -> list[bytes]:
    ends = [_frame(state, job, r.index, "", "abort") for r in job.results
            if r.finish_reason is None]
    return [*ends, sse(shutting_down().body()), DONE]


ROUTE = Route(parse=_parse, events=_events, body=_body, farewell=_farewell, id_prefix="cmpl",
              raw_prompts=True)


async def create_completion(request: Request) -> Response:
    return await handle(request, ROUTE)
