"""Per-request sampling parameters (engine side) and the batched sampler.

Rows with repetition / presence / frequency penalties have them applied first. Greedy rows then
take the argmax, so greedy output without penalties equals the reference model's. Sampled rows go
through temperature, top-k, top-p and min-p, then an exponential race (``argmax(p / E)``,
E ~ Exp(1)) whose noise comes from the request's own generator: with ``random_seed`` set, a
request gives the same tokens whatever else is in the batch.
"""

from __future__ import annotations

from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any

import torch

from vlmdeploy.engine.transfer import HostCopy, h2d


@dataclass
class SamplingParams:
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_new_tokens: int = 512
    min_new_tokens: int = 0
    stop_token_ids: frozenset[int] = frozenset()  # user stop ids, plus eos ids unless ignore_eos
    bad_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None
    generator: torch.Generator | None = field(default=None, repr=False)
    # Structured output: the request's grammar state (vlmdeploy.frontend.guided.Guide), which
    # fills the mask of allowed tokens (its class's ``compute_rows`` and ``finish_rows`` fill a
    # step's rows together: GuideMasks) and advances with each token read.
    guide: Any = field(default=None, repr=False)

    @property
    def penalised(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    @property
    def needs_last_token(self) -> bool:
        """The next step's sampling reads this step's token on the host (the penalties' history,
        the grammar's state), so the engine reads the step before it launches the next."""
        return self.penalised or self.guide is not None


def _apply_penalties(
    logits: torch.Tensor, params: list[SamplingParams], histories: list[list[int]], rows: list[int]
) -> None:
    """Repetition (CTRL-style: shrink the positive logits of tokens already generated, grow the
    negative ones), presence and frequency penalties of ``rows`` of ``logits`` (B, V), in place,
    all rows at once. Nothing waits for the device: the histories go over as one pinned copy and
    the counts are a scatter (no boolean indexing, no bincount, which read sizes back)."""
    width = max(len(histories[i]) for i in rows)
    if not width:
        return
    dev, f32 = logits.device, torch.float32
    ids = h2d([histories[i] + [0] * (width - len(histories[i])) for i in rows], torch.long, dev)
    lengths = h2d([len(histories[i]) for i in rows], torch.long, dev)
    index = h2d(rows, torch.long, dev)
    x = logits[index]  # (k, V), a copy
    weight = (torch.arange(width, device=dev)[None, :] < lengths[:, None]).to(x.dtype)
    counts = torch.zeros_like(x).scatter_add_(1, ids, weight)
    seen = counts > 0
    rep = h2d([params[i].repetition_penalty for i in rows], f32, dev)[:, None].to(x.dtype)
    x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    freq = h2d([params[i].frequency_penalty for i in rows], f32, dev)[:, None].to(x.dtype)
    presence = h2d([params[i].presence_penalty for i in rows], f32, dev)[:, None].to(x.dtype)
    logits[index] = x - (freq * counts + presence * seen.to(x.dtype))


def _filter_sorted(
    logits: torch.Tensor, params: list[SamplingParams]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature, top-k, top-p and min-p for a batch of rows at once: logits (k, V) →
    (unnormalised probabilities in descending order (k, V), their token ids (k, V))."""
    dev, vocab = logits.device, logits.shape[-1]
    f32 = torch.float32
    temps = h2d([max(p.temperature, 1e-5) for p in params], f32, dev)[:, None]
    top_k = h2d([p.top_k if 0 < p.top_k < vocab else vocab for p in params], torch.long, dev)
    top_k = top_k[:, None]
    top_p = h2d([p.top_p for p in params], f32, dev)[:, None]
    min_p = h2d([p.min_p for p in params], f32, dev)[:, None]
    sorted_logits, order = (logits / temps).sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=dev)[None, :]
    probs = torch.softmax(sorted_logits.masked_fill(rank >= top_k, float("-inf")), dim=-1)
    # top-p keeps the smallest prefix whose mass reaches top_p; the top token always stays (also
    # for top_p = 0, which would otherwise drop everything)
    drop = (probs.cumsum(-1) - probs >= top_p) & (rank > 0)
    drop |= probs < min_p * probs[:, :1]
    return probs.masked_fill(drop, 0.0), order


def _mask_tokens(logits: torch.Tensor, p: SamplingParams, num_output: int) -> None:
    vocab = logits.shape[-1]
    # An id outside the vocabulary can never be sampled anyway; indexing with it would raise
    # inside the engine step and take every other request down with it.
    banned = [t for t in p.bad_token_ids if 0 <= t < vocab]
    if num_output < p.min_new_tokens:
        banned += [t for t in p.stop_token_ids if 0 <= t < vocab]
    if banned:
        logits[h2d(banned, torch.long, logits.device)] = float("-inf")


class GuideMasks:
    """The token masks of a step's guided rows: one int32 bitmask (rows, ceil(V / 32)), bit t of a
    row set when its grammar allows token t next, filled on the host by the guides' class in two
    parts: ``compute_rows`` (the grammars' masks, one call that lets the GIL go) and
    ``finish_rows`` (stop tokens, failed grammars). With a ``worker`` (an executor of one thread)
    the first part runs there while the calling thread goes on; without one it runs now.
    :meth:`bitmask` waits for it and finishes the rows on the calling thread."""

    def __init__(self, params: list[SamplingParams], vocab: int, worker: Executor | None = None):
        self.rows = [i for i, p in enumerate(params) if p.guide is not None]
        self._guides = [params[i].guide for i in self.rows]
        self._kind = type(self._guides[0])
        with torch.inference_mode(False):  # may be written outside inference mode
            self._bitmask = torch.zeros(len(self.rows), (vocab + 31) // 32, dtype=torch.int32)
        self._args = (self._guides, self._bitmask, list(range(len(self.rows))))
        self._job: Future | None = None
        if worker is None:
            self._kind.compute_rows(*self._args)
        else:
            self._job = worker.submit(self._kind.compute_rows, *self._args)
        self._finished = False

    def bitmask(self) -> torch.Tensor:
        """The filled masks (what computing them raised is raised here)."""
        if not self._finished:
            if self._job is not None:
                self._job.result()
            self._kind.finish_rows(*self._args)
            self._finished = True
        return self._bitmask


def _apply_guides(
    logits: torch.Tensor, params: list[SamplingParams], masks: GuideMasks | None
) -> None:
    """Tokens a row's grammar does not allow next get -inf, in one pass on the device."""
    if not any(p.guide is not None for p in params):
        return
    vocab = logits.shape[-1]
    if masks is None:
        masks = GuideMasks(params, vocab)
    dev = logits.device
    shifts = torch.arange(32, device=dev, dtype=torch.int32)
    bits = h2d(masks.bitmask(), torch.int32, dev)[:, :, None] >> shifts
    allowed = (bits & 1).bool().flatten(1)[:, :vocab]  # (rows, V)
    index = h2d(masks.rows, torch.long, dev)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))


NON_FINITE = -1  # what :meth:`SampleResult.resolve` reports for a row whose logits were NaN or inf


class SampleResult:
    """The tokens of one sampling call, computed on the device; :meth:`resolve` brings them (and
    the asked-for logprobs) to the host, waiting only for this step's own kernels. A row whose
    logits held NaN or +inf resolves to ``NON_FINITE``: its token is noise, and the engine ends
    that request with an error instead of streaming it."""

    def __init__(
        self,
        tokens: torch.Tensor,
        logprobs: _LogprobRows | None = None,
        logits: torch.Tensor | None = None,
    ):
        self.tokens = tokens  # (B,) int64 on the logits' device: the next step reads it there
        host = tokens
        if logits is not None:  # NaN propagates through the max, and so does +inf (-inf masks)
            host = torch.where(torch.isfinite(logits.amax(-1)), tokens, NON_FINITE)
        self._tokens = HostCopy(host)
        self._logprobs = logprobs
        self._parts = None if logprobs is None else [HostCopy(t) for t in logprobs.tensors()]

    def resolve(self) -> tuple[list[int], list[dict[int, float] | None]]:
        tokens = self._tokens.get().tolist()
        if self._logprobs is None:
            return tokens, [None] * len(tokens)
        return tokens, self._logprobs.to_dicts([c.get() for c in self._parts], tokens)


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    histories: list[list[int]],
    num_outputs: list[int],
) -> tuple[list[int], list[dict[int, float] | None]]:
    """logits: (B, V) → one token per row (and its top-logprobs when asked). ``logits`` is not
    modified."""
    return sample_async(logits, params, histories, num_outputs).resolve()


def sample_async(
    logits: torch.Tensor,
    params: list[SamplingParams],
    histories: list[list[int]],
    num_outputs: list[int],
    masks: GuideMasks | None = None,
) -> SampleResult:
    """:func:`sample` with every kernel queued and nothing waited for: the host learns the tokens
    at :meth:`SampleResult.resolve`. Penalised rows read ``histories``, so those must be known.
    Guided rows take their masks from ``masks`` (started earlier: see :class:`GuideMasks`), or
    have them filled now."""
    dev = logits.device
    masked = [
        i
        for i, p in enumerate(params)
        if p.bad_token_ids
        or (num_outputs[i] < p.min_new_tokens and p.stop_token_ids)
        or p.guide is not None
    ]
    penalised = [i for i, p in enumerate(params) if p.penalised]
    if not (masked or penalised) and all(p.greedy and p.logprobs is None for p in params):
        # The common batch: argmax in the logits' own dtype (widening is exact, so the same
        # token), no (B x V) float copy, no gather.
        return SampleResult(logits.argmax(-1), logits=logits)
    raw = logits.float()  # (B, V); may alias the caller's tensor, so it is only read
    # a (B x V) copy only when a row must be changed
    logits = raw.clone() if masked or penalised else raw
    for i in masked:
        _mask_tokens(logits[i], params[i], num_outputs[i])
    _apply_guides(logits, params, masks)
    if penalised:  # greedy rows too: their argmax is taken after the penalties
        _apply_penalties(logits, params, histories, penalised)
    tokens = logits.argmax(-1)  # right for the greedy rows; sampled rows are overwritten below
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:  # all sampled rows together: one sort, one race
        index = h2d(sampled, torch.long, dev)
        rows = logits[index]  # (k, V), a copy
        probs, order = _filter_sorted(rows, [params[i] for i in sampled])
        noise = torch.empty_like(probs)
        for r, i in enumerate(sampled):  # each request's own generator: batch-independent draws
            noise[r].exponential_(generator=params[i].generator)
        # Noise is drawn in vocabulary order and read through the sort: a token's draw must not
        # depend on its rank, which tiny numeric differences between batches can reorder.
        choice = (probs / noise.gather(1, order)).argmax(-1, keepdim=True)
        tokens[index] = order.gather(1, choice)[:, 0]
    return SampleResult(tokens, _LogprobRows.compute(raw, params, tokens), logits=raw)


class _LogprobRows:
    """Log-softmax of the raw logits (before penalties, masks and temperature) for the rows that
    asked: the top ``logprobs`` entries plus the sampled token, on the device until resolved."""

    def __init__(self, rows: list[int], ks: list[int], top_values, top_ids, chosen):
        self.rows, self.ks = rows, ks
        self.top_values, self.top_ids, self.chosen = top_values, top_ids, chosen

    @classmethod
    def compute(
        cls, raw: torch.Tensor, params: list[SamplingParams], tokens: torch.Tensor
    ) -> _LogprobRows | None:
        rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not rows:
            return None
        ks = [min(params[i].logprobs, raw.shape[-1]) for i in rows]
        index = h2d(rows, torch.long, raw.device)
        logp = torch.log_softmax(raw[index], dim=-1)  # (k, V)
        top = torch.topk(logp, max(ks), dim=-1)
        chosen = logp.gather(1, tokens[index][:, None])[:, 0]
        return cls(rows, ks, top.values, top.indices, chosen)

    def tensors(self) -> list[torch.Tensor]:
        return [self.top_values, self.top_ids, self.chosen]

    def to_dicts(
        self, parts: list[torch.Tensor], tokens: list[int]
    ) -> list[dict[int, float] | None]:
        values, ids, chosen = (t.tolist() for t in parts)
        out: list[dict[int, float] | None] = [None] * len(tokens)
        for r, (i, k) in enumerate(zip(self.rows, self.ks)):
            entry = dict(zip(ids[r][:k], values[r][:k]))
            entry[tokens[i]] = chosen[r]
            out[i] = entry
        return out
