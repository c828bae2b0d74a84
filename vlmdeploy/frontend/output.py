"""From the engine's token stream to what callers read.

:class:`OutputProcessor` turns one request's :class:`~vlmdeploy.engine.io.StepOutput` objects into
:class:`GenOut` deltas: generated ids are detokenized as they come
(:class:`IncrementalDetokenizer`), stop strings are cut
(:class:`~vlmdeploy.frontend.stop_words.StopMatcher`), and stop tokens are dropped from the text
and the ids while still counted in ``generate_token_len``. A ``GenOut`` is the server's unit; the
Python API turns each into a :class:`~vlmdeploy.messages.Response` (:func:`to_response`) and folds
deltas into whole responses (:func:`merge_response`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from vlmdeploy.engine.io import StepOutput
from vlmdeploy.frontend.stop_words import StopMatcher
from vlmdeploy.frontend.tokenizer import Tokenizer
from vlmdeploy.messages import Response

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # tokenizers < 0.21
    DecodeStream = None

if TYPE_CHECKING:
    from vlmdeploy.frontend.prepare import PreparedRequest


@dataclass
class GenOut:
    """One streamed delta (the server's unit)."""

    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None
    input_token_len: int
    generate_token_len: int
    cached_tokens: int = 0
    error: str | None = None  # why the request failed, when finish_reason is 'error'


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without re-decoding everything each step.

    Text is released only once it no longer ends in an incomplete UTF-8 sequence, so a multi-byte
    character split across tokens is emitted whole. With a fast tokenizer this is the tokenizers
    library's ``DecodeStream`` (one native call per token); otherwise two windowed decodes per
    token. ``flush()`` at the end makes the total text equal to decoding all ids at once. A request
    uses either ``add`` (streaming) or ``append`` (decode once at the end), not both.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""
        self._backend = getattr(tokenizer.hf, "backend_tokenizer", None)
        fast = self._backend is not None and DecodeStream is not None
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens) if fast else None

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        if self._stream is not None:
            delta = self._stream.step(self._backend, token_id) or ""
            self.text += delta
            return delta
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset], self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset :], self.skip)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta

    def append(self, token_id: int) -> None:
        """Take a token without decoding now: ``flush()`` at the end decodes everything once."""
        self.ids.append(token_id)

    def flush(self) -> str:
        """Whatever is still held back (e.g. a trailing incomplete character) at the end of
        generation."""
        full = self.tok.decode(self.ids, self.skip)
        delta = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text += delta
        return delta


class OutputProcessor:
    """One request's engine outputs → text deltas: detokenizes, applies stop words, drops stop
    tokens. ``incremental=False`` decodes the text once at the end, for callers that only want the
    whole response (unless stop words need the text as it grows)."""

    def __init__(self, tokenizer: Tokenizer, req: PreparedRequest, incremental: bool = True):
        self.req = req
        self.detok = IncrementalDetokenizer(tokenizer, req.gen_config.skip_special_tokens)
        self.stops = StopMatcher(
            req.gen_config.stop_words or [], include=req.gen_config.include_stop_str_in_output
        )
        # Stop words are matched on text as it grows, so they need the incremental decode.
        self.incremental = incremental or bool(req.gen_config.stop_words)
        self.finish_reason: str | None = None
        self.engine_done = False  # the engine has released the request
        self.generated = self.cached = 0

    def process(self, out: StepOutput) -> GenOut:
        self.engine_done = out.finish_reason is not None
        ids: list[int] = []
        text, lps = "", None
        is_stop_token = (
            out.finish_reason == "stop" and out.token_id in self.req.sampling.stop_token_ids
        )
        if out.token_id is not None and not is_stop_token:
            ids, lps = [out.token_id], ([out.logprobs] if out.logprobs is not None else None)
            if self.incremental:
                text = self.detok.add(out.token_id)
            else:
                self.detok.append(out.token_id)  # decoded once, by flush() at the end
        if out.finish_reason:
            text += self.detok.flush()
        text, hit = self.stops.feed(text)
        reason = "stop" if hit else out.finish_reason
        if reason is not None and not hit:
            text += self.stops.flush()  # held-back text that turned out not to be a stop string
        self.finish_reason = reason
        # a final error/abort output carries no counts: keep what earlier outputs reported
        self.generated = max(self.generated, out.num_output_tokens)
        self.cached = max(self.cached, out.num_cached_tokens)
        return GenOut(
            text, ids, lps, reason, self.req.input_token_len, self.generated, self.cached, out.error
        )


def to_response(d: GenOut, index: int) -> Response:
    """A delta as the Python API's ``Response``; ``index`` is the prompt's place in its batch."""
    return Response(
        text=d.text,
        generate_token_len=d.generate_token_len,
        input_token_len=d.input_token_len,
        finish_reason=d.finish_reason,
        token_ids=d.token_ids,
        logprobs=d.logprobs,
        index=index,
        cached_tokens=d.cached_tokens,
        error_message=d.error,
    )


def merge_response(acc: Response, r: Response) -> Response:
    """Fold a delta into the accumulated response (``acc`` owns its lists: the first delta's
    lists are fresh per output, so extending them in place is safe)."""
    acc.text += r.text
    acc.token_ids.extend(r.token_ids)
    if r.logprobs is not None:
        if acc.logprobs is None:
            acc.logprobs = []
        acc.logprobs.extend(r.logprobs)
    acc.generate_token_len, acc.finish_reason = r.generate_token_len, r.finish_reason
    acc.cached_tokens = r.cached_tokens
    acc.error_message = r.error_message
    return acc
