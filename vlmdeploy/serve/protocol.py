"""Request schemas of the OpenAI-compatible routes, with every size bounded.

Scalar parameters are validated by pydantic in strict mode (`"10"`, `10.5`, `true` are not integers;
`NaN` never parses). Unknown fields are accepted, as OpenAI clients send vendor extras, and only
their names are logged; they are never forwarded anywhere. Messages are validated by
`vlmdeploy.serve.messages`, which names the exact bad element in `param`.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from vlmdeploy.serve.schemas import MESSAGES_SCHEMA

MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024
MAX_PROMPTS = 64
MAX_SEED = 2**63 - 1


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class SamplingParams(BaseModel):
    """Parameters shared by chat and text completions (OpenAI's, plus LMDeploy/vLLM extras)."""

    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # extras LMDeploy and vLLM users send
    top_k: int = Field(-1, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    skip_special_tokens: bool = True
    return_token_ids: bool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, value: Any) -> Any:
        items = [value] if isinstance(value, str) else value
        if value is None:
            return None
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise ValueError("must be a string or a list of strings")
        if len(items) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s or len(s) > MAX_STOP_CHARS for s in items):
            raise ValueError(f"stop strings must be 1..{MAX_STOP_CHARS} characters")
        return items

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _check_logit_bias(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, dict) or len(value) > 300:
            raise ValueError("must be an object of at most 300 token ids")
        for key, bias in value.items():
            if not key.isdigit() or isinstance(bias, bool) or not isinstance(bias, int | float):
                raise ValueError("keys must be token ids and values numbers")
            if not -100 <= bias <= 100:
                raise ValueError("values must be in [-100, 100]")
        return {k: float(v) for k, v in value.items()}

    @model_validator(mode="after")
    def _check_streaming(self) -> SamplingParams:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        return self

    @property
    def stop_list(self) -> list[str]:
        return list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingParams):
    # validated by vlmdeploy.serve.chat_messages (exact params); the schema only documents it
    messages: Annotated[list[Any], WithJsonSchema(MESSAGES_SCHEMA)]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    chat_template_kwargs: dict[str, Any] | None = None
    # validated by vlmdeploy.serve.tools (exact params)
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    _tool_plan: Any = PrivateAttr(None)  # set by the route (vlmdeploy.serve.tools)

    @property
    def tool_plan(self) -> Any:
        return self._tool_plan

    @tool_plan.setter
    def tool_plan(self, plan: Any) -> None:
        self._tool_plan = plan
    # accepted for the one value that means "nothing special"; anything else is refused
    response_format: dict[str, Any] | None = None
    chat_template: str | None = None
    prompt_logprobs: int | None = None

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingParams):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for /v1/completions
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    prompt_logprobs: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, value: Any) -> Any:
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value and all(isinstance(p, str) for p in value):
            if len(value) > MAX_PROMPTS:
                raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
            return value
        raise ValueError("must be a string or a non-empty list of strings")

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

