"""OpenAI request parameters -> `GenerationConfig`, with OpenAI's sampling semantics.

* `temperature: 0` decodes greedily, any other temperature samples; OpenAI's default is 1.0. Every
  request is `do_sample=True` (as LMDeploy's server makes them), so a greedy request keeps its
  penalties, as in LMDeploy's and vLLM's servers.
* `top_k` is off unless given (OpenAI has none); vLLM's `-1` and `0` both mean off.
* Choice `i` of a request with `seed` uses `seed + i`, so `n` seeded choices differ yet repeat run
  to run.
* Stop strings are matched by the server on the decoded text (`vlmdeploy.serve.generation`), because
  OpenAI's `stop` is text, not tokens, and the matched string is not part of the answer.
* A parameter we cannot honour is refused with 400 `unsupported_parameter`, never silently ignored.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vlmdeploy.messages import GenerationConfig
from vlmdeploy.serve.body import parse_json_object
from vlmdeploy.serve.errors import APIError, invalid
from vlmdeploy.serve.protocol import (
    MAX_SEED,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingParams,
)

ALLOWED_TEMPLATE_KWARGS = {"enable_thinking": bool}
_GEN_FIELDS = {f.name for f in dataclasses.fields(GenerationConfig)}


def _unsupported(param: str, what: str) -> APIError:
    return invalid(f"{what} is not supported by this server.", param=param,
                   code="unsupported_parameter")


def check_chat_request(req: ChatCompletionRequest, session_len: int | None = None) -> None:
    """Refuse the chat parameters we do not implement (CVE-class inputs included)."""
    if req.chat_template is not None:
        raise _unsupported("chat_template", "A request-supplied chat template")
    if req.top_logprobs is not None and not req.logprobs:
        raise invalid("top_logprobs requires logprobs=true.", param="top_logprobs")
    _check_common(req, session_len)


def check_completion_request(req: CompletionRequest, session_len: int | None = None) -> None:
    if req.echo:
        raise _unsupported("echo", "echo")
    if req.suffix is not None:
        raise _unsupported("suffix", "suffix")
    if req.best_of not in (None, 1):
        raise _unsupported("best_of", "best_of")
    if len(req.prompts) * req.n > 64:
        raise invalid("len(prompt) * n must be at most 64.", param="n")
    _check_common(req, session_len)


def _check_common(req: ChatCompletionRequest | CompletionRequest,
                  session_len: int | None = None) -> None:
    if req.prompt_logprobs is not None:
        raise _unsupported("prompt_logprobs", "prompt_logprobs")
    if req.logit_bias:
        raise _unsupported("logit_bias", "logit_bias")
    limit = req.max_new_tokens
    if limit is not None and req.min_tokens > limit:
        raise invalid("min_tokens must not exceed max_tokens.", param="min_tokens")
    # a prompt has at least one token, so at most session_len - 1 remain for the output; the
    # prompt's own length is counted when it is prepared
    if session_len is not None and req.min_tokens >= session_len:
        raise invalid(f"min_tokens must be below the context length ({session_len}).",
                      param="min_tokens")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) != 0.0 and name not in _GEN_FIELDS:
            raise _unsupported(name, name)


def template_kwargs(raw: dict[str, Any] | None) -> dict[str, Any] | None:
    """Allowlist of `chat_template_kwargs`: a template must never see `tokenize` & co
    (CVE-2025-62426)."""
    if not raw:
        return None
    for key, value in raw.items():
        kind = ALLOWED_TEMPLATE_KWARGS.get(key)
        if kind is None:
            allowed = ", ".join(ALLOWED_TEMPLATE_KWARGS)
            raise invalid(f"chat_template_kwargs.{key} is not allowed; allowed: {allowed}.",
                          param=f"chat_template_kwargs.{key}")
        if not isinstance(value, kind):
            raise invalid(f"chat_template_kwargs.{key} must be a {kind.__name__}.",
                          param=f"chat_template_kwargs.{key}")
    return dict(raw)


def generation_config(req: SamplingParams, max_new_tokens: int | None, num_logprobs: int | None,
                      choice: int = 0) -> GenerationConfig:
    """The engine parameters of choice `choice` of `req` (already validated)."""
    kwargs: dict[str, Any] = dict(
        n=1,
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=max(req.top_k, 0),
        min_p=req.min_p,
        repetition_penalty=req.repetition_penalty,
        ignore_eos=req.ignore_eos,
        random_seed=None if req.seed is None else (req.seed + choice) % (MAX_SEED + 1),
        min_new_tokens=req.min_tokens or None,
        skip_special_tokens=req.skip_special_tokens,
        logprobs=num_logprobs,
        response_format=response_format(req),
    )
    for name in ("presence_penalty", "frequency_penalty"):
        if name in _GEN_FIELDS:
            kwargs[name] = getattr(req, name)
    try:
        return GenerationConfig(**kwargs)
    except (ValueError, NotImplementedError) as exc:
        raise invalid(str(exc)) from None


# vLLM's and LMDeploy's structured-output fields, as GenerationConfig.response_format shapes.
_GUIDED = {
    "guided_json": lambda v: {"type": "json_schema", "json_schema": {"name": "guided_json",
                                                                     "schema": _schema(v)}},
    "guided_regex": lambda v: {"type": "regex_schema", "regex_schema": v},
    "guided_choice": lambda v: {"type": "choice", "choice": v},
}
# Fields that would change the output and that this server does not implement: refused.
_GUIDED_REFUSED = ("guided_grammar", "guided_whitespace_pattern", "structured_outputs")
_OPENAI_FORMATS = ("text", "json_object", "json_schema", "regex_schema")


def _schema(value: Any) -> Any:
    """A `guided_json` given as text, parsed as strictly as a request body (no `NaN`, and
    nesting too deep for the parser is a 400, not a `RecursionError`)."""
    if isinstance(value, str):
        try:
            return parse_json_object(value.encode("utf-8", "surrogatepass"))
        except APIError:
            raise invalid(
                "guided_json must be a JSON schema (an object, or its JSON text).",
                param="guided_json",
            ) from None
    return value


def response_format(req: SamplingParams) -> dict[str, Any] | None:
    """The request's structured-output format: OpenAI's ``response_format`` (``json_object``,
    ``json_schema``; LMDeploy's ``regex_schema``) or one of vLLM's ``guided_json``,
    ``guided_regex``, ``guided_choice``. ``guided_decoding_backend`` is accepted and has no
    effect (one backend here); a field we cannot honour is a 400."""
    extra = req.model_extra or {}
    for name in _GUIDED_REFUSED:
        if extra.get(name) is not None:
            raise _unsupported(name, name)
    fmt = getattr(req, "response_format", None)
    if fmt is not None and fmt.get("type") not in _OPENAI_FORMATS:
        raise invalid(f"response_format.type must be one of {', '.join(_OPENAI_FORMATS)}.",
                      param="response_format")
    if fmt is not None and fmt.get("type") == "text":
        fmt = None
    given = [name for name in _GUIDED if extra.get(name) is not None]
    if len(given) + (fmt is not None) > 1:
        raise invalid("Give at most one of response_format, guided_json, guided_regex and "
                      "guided_choice.", param=given[0])
    if given:
        fmt = _GUIDED[given[0]](extra[given[0]])
    plan = getattr(req, "tool_plan", None)
    if plan is not None and plan.grammar is not None:  # a forced tool call has its own grammar
        if fmt is not None:
            raise invalid("A forced tool call (tool_choice) cannot be combined with a response "
                          "format.", param="tool_choice")
        fmt = {"type": "lark", "lark": plan.grammar}
    return fmt
