"""A validated, prepared generation request (a "job"), and `handle`, the request flow that chat
and text completions share.

Everything that can refuse a request happens before a response starts: body limits, prompts over
`max_prompt_chars` or of more pieces than `session_len` (on the parsed body, before any object is
built from it), schema, model name, unsupported parameters, text that cannot be encoded,
admission, and `pipe.prepare` (image fetch/decode, chat template, tokenization, the context-length
check). A streaming client therefore gets a plain HTTP error, never a 200 followed by an error
frame, for anything wrong with its input.

A request is admitted (takes one of `max_concurrent_requests` slots, waiting for one in arrival
order when all are taken) only once its body has been read and validated: clients that open
connections and send nothing, or send slowly, never make real requests wait or get 429.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from vlmdeploy.errors import EngineDeadError, InvalidRequestError
from vlmdeploy.frontend.limits import check_prompt_size, find_unencodable, unencodable
from vlmdeploy.serve.body import body_bytes, read_json_object
from vlmdeploy.serve.contract import Prepared
from vlmdeploy.serve.errors import from_exception, from_validation_errors
from vlmdeploy.serve.generation import ChoiceResult, Delta, run_choice
from vlmdeploy.serve.memory import release_memory_soon
from vlmdeploy.serve.protocol import SamplingParams
from vlmdeploy.serve.sampling import generation_config
from vlmdeploy.serve.state import ServerState, get_state
from vlmdeploy.serve.streaming import ClientGone, SSEResponse, merge, until_disconnected

logger = logging.getLogger("vlmdeploy.serve")
M = TypeVar("M", bound=BaseModel)


# The pipeline's names for what the OpenAI API calls otherwise.
_PARAMS = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}


@dataclass
class Job:
    req: Any  # ChatCompletionRequest | CompletionRequest
    prepared: list[Prepared]  # one per choice; choices of one prompt share it unless seeded
    prompt_tokens: int
    arrival: float
    id: str
    created: int
    results: list[ChoiceResult] = field(init=False)  # one per choice, filled as it streams

    def __post_init__(self) -> None:
        self.results = [ChoiceResult(i) for i in range(len(self.prepared))]


def check_body(body: dict[str, Any], state: ServerState, prompt_field: str) -> None:
    """The size check on the parsed body, before any object is built from it: the prompt's text
    within `max_prompt_chars`, its messages and parts fewer than `session_len`."""
    check_prompt_size(body.get(prompt_field), state.max_prompt_chars, state.pipe.session_len,
                      prompt_field)


def check_text(**fields: Any) -> None:
    """Every string that can reach the tokenizer, a file name or a URL (prompt text, image
    sources, stop strings; validated, so bounded) must be encodable: a lone surrogate is a 400
    naming its place, never a 500 from the tokenizer."""
    for param, value in fields.items():
        where = find_unencodable(value, param)
        if where is not None:
            raise unencodable(where)


async def read_request(request: Request, state: ServerState, model: type[M],
                       prompt_field: str | None = None) -> M:
    """Body -> validated request model; 400 in OpenAI's envelope on any schema error."""
    body = await read_json_object(request, state.config.max_body_bytes,
                                  state.config.body_timeout_s, state.closing)
    if prompt_field is not None:
        check_body(body, state, prompt_field)
    try:
        req = model.model_validate(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        raise from_validation_errors(list(errors)) from None
    if req.model_extra:  # accepted for compatibility, never forwarded; names only, never values
        names = sorted(req.model_extra)[:20]
        logger.info("ignored request fields: %s", ", ".join(repr(n[:40]) for n in names))
    state.check_model(getattr(req, "model", None))
    return req


async def prepare_job(state: ServerState, req: SamplingParams, prompts: list[Any],
                      template_kwargs: dict[str, Any] | None, prefix: str,
                      raw: bool = False) -> Job:
    """`pipe.prepare` every prompt (once per choice only when seeded choices need distinct configs).

    `raw` prompts (text completions) skip the chat template (`do_preprocess=False`, LMDeploy's
    name)."""
    arrival = time.monotonic()
    prepared, prompt_tokens = [], 0
    for prompt in prompts:
        configs = [generation_config(req, req.max_new_tokens, req.num_logprobs, i)
                   for i in range(req.n)]
        distinct = configs if req.seed is not None and req.n > 1 else configs[:1]
        try:
            first = await state.pipe.prepare(prompt, distinct[0], media_policy=state.media_policy,
                                             chat_template_kwargs=template_kwargs,
                                             do_preprocess=not raw)
            # seeded choices: the same prompt and images, another seed
            items = [first, *(state.pipe.reconfigure(first, cfg) for cfg in distinct[1:])]
        except InvalidRequestError as exc:
            exc.param = _PARAMS.get(exc.param or "", exc.param)
            raise
        prepared += items if len(items) == req.n else items * req.n
        prompt_tokens += items[0].input_token_len
    return Job(req=req, prepared=prepared, prompt_tokens=prompt_tokens, arrival=arrival,
               id=f"{prefix}-{uuid.uuid4().hex}", created=int(time.time()))


def choice_streams(state: ServerState, job: Job) -> list[AsyncGenerator[Delta, None]]:
    stops = job.req.stop_list
    return [run_choice(state.pipe, item, state.next_session_id(), stops, state.metrics, job.arrival)
            for item in job.prepared]


def usage(job: Job, results: list[ChoiceResult]) -> dict[str, Any]:
    completion = sum(r.completion_tokens for r in results)
    cached = max((r.cached_tokens for r in results), default=0)
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": completion,
            "total_tokens": job.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


async def collect(state: ServerState, job: Job) -> list[ChoiceResult]:
    """Run every choice of `job` to the end (non-streaming responses)."""
    async with aclosing(merge(choice_streams(state, job))) as events:
        async for index, delta in events:
            job.results[index].add(delta)
    return job.results


@dataclass(frozen=True)
class Route:
    """What distinguishes chat from text completions; `handle` does the rest. `farewell` gives the
    last frames of a stream cut at shutdown: an `abort` chunk per unfinished choice, the error
    event and `[DONE]`."""

    parse: Callable[[Request, ServerState], Awaitable[tuple[Any, list[Any], dict | None]]]
    events: Callable[[ServerState, Job], AsyncGenerator[bytes, None]]
    body: Callable[[ServerState, Job, list[ChoiceResult]], dict[str, Any]]
    farewell: Callable[[ServerState, Job], list[bytes]]
    id_prefix: str
    raw_prompts: bool = False


async def handle(request: Request, route: Route) -> Response:
    """Validation, admission and preparation, then an SSE stream or one JSON body. The admission
    slot is taken once the body is read and valid, and held until the response (or the stream)
    ends, whichever way it ends."""
    state = get_state(request)
    state.check_alive()
    slot = None
    try:
        req, prompts, kwargs = await route.parse(request, state)
        slot = state.admission.try_enter()
        if slot is None:  # all slots taken: wait for one, unless the client leaves first
            slot = await until_disconnected(request, state.admission.wait(), state.closing)
        job = await until_disconnected(request, prepare_job(
            state, req, prompts, kwargs, route.id_prefix, route.raw_prompts), state.closing)
        if req.stream:
            response = SSEResponse(route.events(state, job), on_close=slot.release,
                                   closing=state.closing,
                                   farewell=lambda: route.farewell(state, job))
            slot = None  # the response releases it when the stream ends
            return response
        results = await until_disconnected(request, collect(state, job), state.closing)
        return JSONResponse(route.body(state, job, results))
    except ClientGone:
        return Response(status_code=499)  # nobody is listening; nginx's "client closed request"
    except Exception as exc:  # every failure is answered in the envelope, never re-raised
        if isinstance(exc, EngineDeadError):
            state.mark_dead()
        release_memory_soon(body_bytes(request))  # a refused request's memory goes back
        return from_exception(exc).response()
    finally:
        if slot is not None:
            slot.release()
