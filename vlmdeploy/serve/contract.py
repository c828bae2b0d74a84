"""What the server needs from a pipeline: :class:`ServedPipeline`, a structural protocol.

The server is written against this protocol, never against the front end's ``Pipeline`` itself:
it imports nothing of the engine, and any object with these members can serve (the real pipeline;
``tests/serve/fake_pipeline.py``, a scripted test double). The protocol lives with its consumer:
the server says what it needs, the front end satisfies it, and tests check both implementations
against it.

A request's life through it: ``prepare`` (validation, media, template, tokens; every refusal comes
from here, before the first byte of a response), ``reconfigure`` for seeded choices of the same
prompt, ``generate_prepared`` under an id from ``new_session_id``, ``abort`` when the client goes
away or a stop string ends the choice. ``stats`` reports engine load and raises
:class:`~vlmdeploy.errors.EngineDeadError` once the engine has failed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

from vlmdeploy.messages import GenerationConfig


class Prepared(Protocol):
    """A prepared request: opaque to the server but for its prompt's size."""

    @property
    def input_token_len(self) -> int: ...


class OutputDelta(Protocol):
    """One streamed output of a request; ``finish_reason`` is set on its last one."""

    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None  # per token: {token id: logprob}, the sampled included
    finish_reason: str | None
    input_token_len: int
    generate_token_len: int
    cached_tokens: int


class TokenDecoder(Protocol):
    """Enough of a tokenizer to spell out logprobs' tokens."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


@runtime_checkable
class ServedPipeline(Protocol):
    model_name: str
    session_len: int  # prompt + output tokens of one request (the model card's max_model_len)
    tokenizer: TokenDecoder

    async def prepare(
        self,
        prompt: Any,
        gen_config: GenerationConfig | None = None,
        media_policy: Any = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        do_preprocess: bool = True,
    ) -> Prepared:
        """Validate and preprocess a prompt (a message list, or with ``do_preprocess=False`` a
        raw string); raises :class:`~vlmdeploy.errors.InvalidRequestError` on bad input."""
        ...

    def reconfigure(self, req: Any, gen_config: GenerationConfig) -> Prepared:
        """``req``'s prompt and images under another generation config, without re-fetching."""
        ...

    def generate_prepared(self, req: Any, session_id: int) -> AsyncIterator[OutputDelta]:
        """The request's deltas; closing the iterator early aborts the request. Raises
        :class:`~vlmdeploy.errors.InvalidRequestError` when the request's own input made it fail
        while it ran (a response_format whose grammar hits a limit of the grammar engine)."""
        ...

    def abort(self, session_id: int) -> None: ...

    def stats(self) -> dict[str, float | int]:
        """``num_running``, ``num_waiting``, ``kv_cache_usage`` (0..1), ``num_preemptions``."""
        ...

    def new_session_id(self) -> int:
        """An id no other request of this pipeline uses, Python API requests included."""
        ...
