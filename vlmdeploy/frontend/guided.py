"""Structured output: a request's format → a grammar (llguidance) → a :class:`Guide` per request,
which the sampler asks for the tokens allowed next and tells each token chosen.

Formats (``GenerationConfig.response_format``, LMDeploy's field, which the server fills from
OpenAI's ``response_format`` and vLLM's / LMDeploy's ``guided_*`` fields):

* ``{"type": "text"}``: no constraint;
* ``{"type": "json_object"}``: any JSON object;
* ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}``: JSON valid against
  the schema (OpenAI's shape; LMDeploy's too);
* ``{"type": "regex_schema", "regex_schema": "..."}``: text matching the regular expression
  (LMDeploy's name);
* ``{"type": "choice", "choice": ["a", "b"]}``: exactly one of the strings (vLLM's
  ``guided_choice``);
* ``{"type": "lark", "lark": "..."}``: a grammar in llguidance's Lark dialect (JSON schemas inline
  with ``%json``): what the server uses to force a tool call's exact shape.

llguidance was chosen over xgrammar: on the embedded model's tokenizer (2-core CPU development
machine, 2026-12-07) it built masks in about half xgrammar's time per token (52 µs against 102 µs
for a small JSON schema) and compiled faster, and it is one self-contained wheel where xgrammar
brings its own runtime, Triton and transformers pins. On InternVL3.5's 151,936-token vocabulary a
mask of W3s's three-field JSON schema takes about 0.15 ms on one core of the 2-core CPU machine
(2026-12-08, ``benchmarks.guided_masks``).
Compiled grammars are cached by their text; each request gets a copy of the matcher.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import OrderedDict
from typing import Any

import torch

from vlmdeploy import env
from vlmdeploy.errors import InvalidRequestError

# Compiled grammars kept (each a matcher template, copied per request).
CACHE_SIZE = 256
# JSON without free whitespace between tokens (a schema's own "x-guidance" may ask otherwise):
# what clients parse is the same, and a model cannot spend its tokens on blanks.
_JSON_DEFAULTS = {"whitespace_flexible": False}
_FORMATS = ("text", "json_object", "json_schema", "regex_schema", "choice", "lark")
# The error code of a format whose grammar fails while it runs (a resource limit of llguidance),
# or costs too much to follow.
FORMAT_FAILED = "response_format_failed"
# The most one token's mask may cost on one core. A mask's cost grows with some grammars' size
# (a literal regex of 50,000 characters: about 20 ms a token, whatever the vocabulary), and a
# step waits for its slowest guided row; JSON schemas of hundreds of fields take under 2 ms.
MASK_BUDGET_S = 0.005


def grammar_of(fmt: dict[str, Any] | None) -> str | None:
    """The llguidance grammar of a response format (None: unconstrained); a malformed format is
    an :class:`InvalidRequestError`."""
    if fmt is None:
        return None
    import llguidance  # only constrained requests pay for it

    if not isinstance(fmt, dict) or fmt.get("type") not in _FORMATS:
        raise InvalidRequestError(
            f"response_format.type must be one of {', '.join(_FORMATS)}", param="response_format"
        )
    kind = fmt["type"]
    try:
        if kind == "text":
            return None
        if kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema(
                {"type": "object"}, defaults=_JSON_DEFAULTS
            )
        if kind == "json_schema":
            spec = fmt.get("json_schema")  # OpenAI's {"name": ..., "schema": {...}}
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
                raise InvalidRequestError(
                    "response_format.json_schema must be an object with a name and a schema",
                    param="response_format",
                )
            schema = spec.get("schema")
            if not isinstance(schema, dict):
                raise InvalidRequestError(
                    "response_format.json_schema.schema must be a JSON schema object",
                    param="response_format",
                )
            return llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(schema), defaults=_JSON_DEFAULTS
            )
        if kind == "regex_schema":
            pattern = fmt.get("regex_schema")
            if not isinstance(pattern, str):
                raise InvalidRequestError("regex_schema must be a string", param="response_format")
            return llguidance.LLMatcher.grammar_from_regex(pattern)
        if kind == "lark":
            grammar = fmt.get("lark")
            if not isinstance(grammar, str):
                raise InvalidRequestError("lark must be a string", param="response_format")
            return llguidance.LLMatcher.grammar_from_lark(grammar)
        choices = fmt.get("choice")
        if not (isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices)):
            raise InvalidRequestError(
                "choice must be a non-empty list of strings", param="response_format"
            )
        return llguidance.LLMatcher.grammar_from_regex("|".join(map(re.escape, choices)))
    except InvalidRequestError:
        raise
    except (ValueError, TypeError) as exc:
        message = f"invalid response_format: {exc}"
        raise InvalidRequestError(message, param="response_format") from None


class Guide:
    """One request's grammar state. The sampler calls :meth:`fill` for the mask of the next
    token and the engine :meth:`advance` with each token once it is known.

    A grammar can fail while it runs (llguidance's lexer and parser limits: a regex such as
    ``a{1000000}`` compiles, then gives up after its first token). A failed grammar is never
    taken for a finished one: :meth:`fill` then allows any token and :meth:`advance` refuses it,
    so the engine fails the request instead of ending it as if its output were complete, and the
    reason is kept in :attr:`failure`, shared with the guide's forks (the engine advances a fork of
    the guide it was given: :meth:`for_request` gives each engine request a record of its own)."""

    def __init__(self, matcher: Any, stop_ids: frozenset[int], failures: list[str] | None = None):
        self.matcher = matcher
        self.stop_ids = stop_ids
        self._failures = [] if failures is None else failures

    @property
    def failure(self) -> str | None:
        """Why the grammar failed (a fork's failure included), or None."""
        return self._failures[0] if self._failures else None

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Row ``row`` of the int32 bitmask (rows, ceil(V / 32)): bit t set = token t allowed.
        Once the grammar is complete, the request's stop tokens are allowed too (the
        tokenizer's end-of-text need not be the chat template's end of turn)."""
        Guide.fill_rows([self], bitmask, [row])

    @staticmethod
    def fill_rows(guides: list[Guide], bitmask: torch.Tensor, rows: list[int]) -> None:
        """Row ``rows[i]`` of the int32 bitmask (contiguous, on the host) for ``guides[i]``, as
        :meth:`fill` fills one: a step's guided rows at once, :meth:`compute_rows` then
        :meth:`finish_rows`."""
        Guide.compute_rows(guides, bitmask, rows)
        Guide.finish_rows(guides, bitmask, rows)

    @staticmethod
    def compute_rows(guides: list[Guide], bitmask: torch.Tensor, rows: list[int]) -> None:
        """llguidance's masks of the grammars still running, in one call on its pool of
        ``VLMDEPLOY_MASK_THREADS`` threads. The call holds the GIL only to start and to end, so
        another thread can make it while this process's Python goes on (one call per row would
        wait for the GIL at every row)."""
        import llguidance.torch

        live = [(g.matcher, r) for g, r in zip(guides, rows, strict=True)
                if not g.matcher.is_stopped()]  # fmt: skip
        if live:
            pool = _executor(env.mask_threads())
            llguidance.torch.fill_next_token_bitmask_par(pool, live, bitmask)

    @staticmethod
    def finish_rows(guides: list[Guide], bitmask: torch.Tensor, rows: list[int]) -> None:
        """After :meth:`compute_rows` (the grammars unchanged in between): a failed grammar's row
        allows any token, a finished one's only the stop tokens, an accepting one's its stop
        tokens beside its own."""
        for g, r in zip(guides, rows, strict=True):
            g._finish_row(bitmask, r)

    def _finish_row(self, bitmask: torch.Tensor, row: int) -> None:
        if self.matcher.is_error():  # failed, not finished: advance() fails the request
            bitmask[row].fill_(-1)
            return
        if self.matcher.is_stopped():
            bitmask[row].zero_()
        if self.matcher.is_stopped() or self.matcher.is_accepting():
            for t in self.stop_ids:
                if t < bitmask.shape[1] * 32:
                    bitmask[row, t // 32] |= _bit(t % 32)

    def for_request(self) -> Guide:
        """This guide with a failure record of its own, for one engine request. The matcher is
        not copied: the engine forks the guide it is given before advancing it."""
        return Guide(self.matcher, self.stop_ids)

    def fork(self) -> Guide:
        """A guide of its own for another request with the same grammar and state (the engine
        forks at admission, so requests that share a prepared prompt never share a state). The
        fork reports its failure to this guide's record."""
        return Guide(self.matcher.deep_copy(), self.stop_ids, self._failures)

    def advance(self, token: int) -> bool:
        """Take the token chosen; False when the grammar refuses it or has failed."""
        if not self.matcher.is_error():
            if token in self.stop_ids or self.matcher.is_stopped():
                return True
            if self.matcher.consume_token(token):
                return True
        if not self._failures:
            self._failures.append(error_reason(self.matcher) or "the output left the grammar")
        return False


_EXECUTORS: dict[int, Any] = {}


def _executor(threads: int) -> Any:
    """llguidance's thread pool of ``threads`` threads, one per process."""
    if threads not in _EXECUTORS:
        import llguidance

        _EXECUTORS[threads] = llguidance.LLExecutor(threads)
    return _EXECUTORS[threads]


def error_reason(matcher: Any) -> str:
    """The first line of a matcher's error: what went wrong, without llguidance's state dump."""
    return (matcher.get_error() or "").strip().split("\n", 1)[0]


def _bit(i: int) -> int:
    """Bit ``i`` of an int32 word, as a Python int that fits it (bit 31 is the sign)."""
    return (1 << i) if i < 31 else -(1 << 31)


class GuidedDecoding:
    """Per pipeline: the tokenizer as llguidance sees it, and the cache of compiled grammars."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int):
        self.hf_tokenizer, self.vocab_size = hf_tokenizer, vocab_size
        self._tokenizer = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, Any] = OrderedDict()

    def guide(self, fmt: dict[str, Any] | None, stop_ids: frozenset[int]) -> Guide | None:
        """A request's guide, its first mask computed here (the caller's thread, not the
        engine's), so a grammar that fails at once is refused before the request starts.
        llguidance shares a grammar's lexer between its copies: one that failed on an earlier
        request's path fails every later copy, so it is compiled afresh once before refusing."""
        grammar = grammar_of(fmt)
        if grammar is None:
            return None
        for _ in range(2):
            matcher = self._matcher(grammar)
            matcher.compute_bitmask()
            if not matcher.is_error():
                self._check_mask_cost(matcher)
                return Guide(matcher, stop_ids)
            with self._lock:
                self._cache.pop(grammar, None)
        raise InvalidRequestError(
            f"response_format cannot be followed: {error_reason(matcher)}; simplify it",
            code=FORMAT_FAILED,
            param="response_format",
        )

    @staticmethod
    def _check_mask_cost(matcher: Any) -> None:
        """Refuse a grammar whose masks cost more than :data:`MASK_BUDGET_S` each: every step of
        the batch waits for its guided rows' masks, so one such request would slow every other.
        Timed after the first mask (which also builds lexer states once), the better of two."""
        cost = MASK_BUDGET_S
        for _ in range(2):
            start = time.perf_counter()
            matcher.compute_bitmask()
            cost = min(cost, time.perf_counter() - start)
            if cost < MASK_BUDGET_S:
                return
        raise InvalidRequestError(
            f"response_format is too costly to follow: each token's mask takes over "
            f"{MASK_BUDGET_S * 1e3:g} ms (a very long literal pattern, say); simplify it",
            code=FORMAT_FAILED,
            param="response_format",
        )

    def _matcher(self, grammar: str) -> Any:
        import llguidance

        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                self._tokenizer = llguidance.hf.from_tokenizer(
                    self.hf_tokenizer, n_vocab=self.vocab_size
                )
            template = self._cache.get(grammar)
            if template is None:
                # errors without llguidance's state dump; no warnings on stderr
                limits = llguidance.LLParserLimits(verbose_errors=False)
                template = llguidance.LLMatcher(
                    self._tokenizer, grammar, log_level=0, limits=limits
                )
                if template.is_error():
                    raise InvalidRequestError(
                        f"invalid response_format: {template.get_error()}", param="response_format"
                    )
                self._cache[grammar] = template
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(grammar)
            return template.deep_copy()
