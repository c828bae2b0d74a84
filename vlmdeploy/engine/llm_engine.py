"""The engine core: admission, the step, and the stops that depend on tokens.

Its interface is three calls — :meth:`LLMEngine.add`, :meth:`LLMEngine.abort`,
:meth:`LLMEngine.step` — with plain data in and out (:mod:`vlmdeploy.engine.io`), so the core can
move into its own process without a rewrite. The model, its KV cache and its graphs belong to the
:class:`ModelRunner` of every rank, which the engine reaches through its executor
(:mod:`vlmdeploy.distributed.executor`: in process at tp=1); which sequences run belongs to the
:class:`Scheduler`; this file is the glue.
Token-level stops (eos and stop ids, ``max_new_tokens``, ``session_len``) are decided here;
text-level stops (stop words) by the front end.
"""

from __future__ import annotations

import copy
import gc
import logging
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import torch

from vlmdeploy.distributed import executor as executors  # the module: it imports the engine's
from vlmdeploy.engine import admission
from vlmdeploy.engine.block_manager import BlockManager
from vlmdeploy.engine.config import EngineConfig
from vlmdeploy.engine.io import EngineRequest, StepOutput
from vlmdeploy.engine.observer import EngineObserver, StepRecord
from vlmdeploy.engine.sampling import NON_FINITE, GuideMasks, SampleResult, sample_async
from vlmdeploy.engine.scheduler import ScheduledBatch, Scheduler
from vlmdeploy.engine.sequence import PENDING, Sequence, Status
from vlmdeploy.engine.vision import VisionStage

logger = logging.getLogger("vlmdeploy")


# Steps in a row whose launch may fail before the engine counts itself broken.
MAX_FAILED_STEPS = 3


def _fatal(exc: Exception) -> bool:
    """A CUDA error poisons the context: every later call on the device fails too."""
    accelerator_error = getattr(torch, "AcceleratorError", ())
    return isinstance(exc, accelerator_error) or "CUDA error" in str(exc)


@dataclass
class _InFlight:
    """A launched step: how its rows are sampled and, per sampled row, the sequence, the index of
    its ``PENDING`` token and whether that token ends it on length.

    Sampling is queued at launch, except in a step with guided rows: their masks are filled on the
    mask worker while the engine thread goes on (it hands the step before over and schedules the
    next), and the sampling is queued when the step's tokens are first needed, by the next step's
    forward or by reading the step (:meth:`LLMEngine._sampled`)."""

    sample: Callable[[], SampleResult]
    rows: list[tuple[Sequence, int, bool]] = field(default_factory=list)
    result: SampleResult | None = None  # once queued
    error: Exception | None = None  # what queuing it raised
    read: bool = False  # its tokens have been read (early, by a step whose sampling needed them)


def _gone(seq: Sequence, index: int) -> bool:
    """The request of a step's row stopped at an earlier token, was aborted, or failed."""
    return index >= len(seq.token_ids) or seq.finish_reason in ("abort", "error")


# The index of a row sampled for a sequence that ended while its step was being launched: the
# token is computed and dropped when read.
_DROPPED = sys.maxsize


class LLMEngine:
    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.observer = EngineObserver()
        self.executor = executors.make_executor(cfg, self.observer)
        self.runner = self.executor.runner  # rank 0's (the only one at tp=1)
        self.blocks = BlockManager(
            self.executor.num_blocks, cfg.block_size, cfg.enable_prefix_caching
        )
        self.scheduler = Scheduler(self.blocks, cfg.max_batch_size, cfg.max_prefill_token_num)
        self.vision = VisionStage(
            self.executor.encode_images,
            max_tiles=cfg.max_vision_tiles,
            cache_bytes=cfg.vision_cache_bytes,
            pin_memory=cfg.device.type == "cuda",
            observer=self.observer,
        )
        self.seqs: dict[int, Sequence] = {}
        self._arrivals = 0
        self._inflight: _InFlight | None = None  # the launched step whose tokens are not read yet
        self._mask_worker: ThreadPoolExecutor | None = None  # fills guided rows' masks
        self._failed_steps = 0  # consecutive steps whose launch raised

    def warm_up(self) -> None:
        """One encoder call at every tile count the vision stage can batch, on the calling thread,
        which must be the thread that steps the engine (:class:`EngineLoop` does this before it
        takes requests). cuDNN keeps its attention plans per thread: a shape's first call on a
        thread pays its planning again, even after the same shape ran on another thread
        (docs/results.csv). Nothing to do off CUDA, where a new tile count costs nothing extra."""
        if self.cfg.device.type != "cuda":
            return
        size = self.cfg.model.vision.image_size
        with self.observer.stage("vision_warm_up"), torch.inference_mode():
            self.vision.warm_up((size, size, 3))

    @property
    def num_blocks(self) -> int:
        return self.blocks.num_blocks

    def check_fits(self, num_prompt_tokens: int, max_new_tokens: int) -> str | None:
        """Why a request cannot run (None if it can)."""
        num_blocks = self.blocks.num_blocks
        return admission.check_fits(self.cfg, num_blocks, num_prompt_tokens, max_new_tokens)

    def has_cached_image(self, content_hash: str) -> bool:
        vision = self.vision  # None once released
        return vision is not None and content_hash in vision.cache

    def release(self) -> None:
        """Give the model's, the KV cache's and the graphs' device memory back, deterministically:
        another engine in this process (or another process) can use it as soon as this returns.
        The engine cannot step afterwards."""
        flight = self._inflight
        if flight is not None and flight.result is None and flight.error is None:
            try:  # its tokens go out: the other ranks wait for them before they take the stop
                self._sampled(flight)
            except Exception:  # noqa: BLE001 — the engine is going away either way
                logger.exception("sampling the last step failed while closing")
        if self.runner is not None:
            self.executor.shutdown()
            self.runner = None
        if self.vision is not None:
            self.vision.cache.clear()
            self.vision = None
        for seq in self.seqs.values():
            seq.image_embeds = None
        self.seqs.clear()
        self.scheduler.running.clear()
        self.scheduler.waiting.clear()
        self._inflight = None
        if self._mask_worker is not None:
            self._mask_worker.shutdown()
            self._mask_worker = None
        gc.collect()
        if self.cfg.device.type == "cuda":
            torch.cuda.synchronize(self.cfg.device)
            torch.cuda.empty_cache()

    @property
    def distributed(self) -> bool:
        """Ranks in other processes (tensor parallelism)."""
        return self.executor.distributed

    def failure(self) -> str | None:
        """Why the engine cannot go on although no step raised (a tensor-parallel worker died),
        or None."""
        return self.executor.failure()

    def abandon(self) -> None:
        """The engine thread is stuck and cannot be stopped: stop the worker processes anyway."""
        self.executor.kill()

    # ---- requests --------------------------------------------------------------------------------
    def add(self, request: EngineRequest) -> None:
        seq = Sequence(
            request.request_id,
            list(request.token_ids),
            copy.copy(request.sampling),  # the engine sets its generator
            images=request.images,
        )
        if seq.seq_id in self.seqs:
            raise ValueError(f"request id {seq.seq_id} is already in use")
        if not seq.token_ids or seq.sampling.max_new_tokens < 1:
            raise ValueError("a request needs at least one prompt token and one new token")
        reason = self.check_fits(len(seq), seq.sampling.max_new_tokens)
        reason = reason or admission.check_images(self.cfg, seq.token_ids, seq.images)
        if reason:
            raise ValueError(reason)
        if seq.sampling.guide is not None:  # its own grammar state, whoever shares the request
            seq.sampling.guide = seq.sampling.guide.fork()
        if seq.sampling.seed is not None and not seq.sampling.greedy:
            seq.sampling.generator = torch.Generator(self.cfg.device).manual_seed(seq.sampling.seed)
        seq.arrival = self._arrivals
        self._arrivals += 1
        self.seqs[seq.seq_id] = seq
        self.scheduler.add(seq)

    def abort(self, seq_id: int) -> StepOutput | None:
        seq = self.seqs.pop(seq_id, None)
        if seq is None:
            return None
        self.scheduler.finish(seq, "abort")
        return self._output(seq, None, None)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self._inflight is not None

    def stats(self) -> dict[str, float | int]:
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_cache_usage": self.blocks.usage,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_steps": self.observer.steps,
            "num_tiles_encoded": self.observer.tiles_encoded,
        }

    # ---- the loop --------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Run one step and return the outputs that became known.

        With ``async_scheduling`` (the default) the host does not wait for a step's tokens before
        launching the next one: each sampled token is appended as ``PENDING``, the next step reads
        it on the device, and the step returns the tokens of the step before, read once the new
        one is queued. The GPU then never idles while the host schedules, builds inputs or hands
        outputs over. Stops that depend on a token's value are found one step late: that step's
        extra token for the request is computed and dropped. Sampling that depends on the tokens
        before (penalties read the history, a grammar its state) reads the previous step once
        this step's forward is queued. Grammars' masks are then filled on a worker thread while
        the device runs the forward and this thread hands outputs over and schedules the next
        step, whose launch queues this step's sampling first."""
        outputs: list[StepOutput] = []
        prev, self._inflight = self._inflight, None
        start, tiles = time.perf_counter(), self.observer.tiles_encoded
        batch = self.scheduler.schedule()
        if batch:
            try:
                self._inflight = self._launch(batch, prev, outputs)
                self._failed_steps = 0
            except Exception as exc:  # noqa: BLE001 — fatal ones are raised again in there
                outputs += self._fail_step(batch, exc)
        launched = time.perf_counter()
        if prev is not None and not prev.read:
            outputs += self._read(prev)
        if self._inflight is not None and not self.cfg.async_scheduling:
            outputs += self._read(self._inflight)
            self._inflight = None
        self._observe(batch, start, launched, tiles)
        return outputs

    def _observe(self, batch: ScheduledBatch, start: float, launched: float, tiles: int) -> None:
        record = None
        if self.observer.records is not None:
            decode = sum(1 for n in batch.num_tokens if n == 1)
            record = StepRecord(
                start,
                launched,
                time.perf_counter(),
                decode,
                sum(batch.num_tokens) - decode,
                self.observer.tiles_encoded - tiles,
                len(self.scheduler.waiting),
            )
        self.observer.on_step(record)

    def _launch(
        self, batch: ScheduledBatch, prev: _InFlight | None, outputs: list[StepOutput]
    ) -> _InFlight | None:
        """Queue the forward and sampling of ``batch`` on the device; decide the stops that do not
        depend on the tokens' values (length) now. When a sampled row needs the tokens before it
        on the host, ``prev`` is read between the two (its outputs go to ``outputs``). With
        guided rows, their masks start filling and the sampling is left to the next launch (see
        :class:`_InFlight`)."""
        prev_tokens = None if prev is None else self._sampled(prev).tokens
        self.vision.attach_embeddings(batch.seqs)
        done = [s.num_computed + n == len(s) for s, n in zip(batch.seqs, batch.num_tokens)]
        rows = [i for i, d in enumerate(done) if d]
        # Always runs: mid-prefill chunks must still write KV.
        logits = self.executor.forward(batch, rows, prev_tokens)
        for seq, n in zip(batch.seqs, batch.num_tokens):
            seq.num_computed += n
            self.blocks.commit(seq)
            seq.release_image_embeds()
        if not rows:
            return None
        sampled = [batch.seqs[i] for i in rows]
        params = [s.sampling for s in sampled]
        started: list[GuideMasks] = []  # this step's masks, once the grammars have advanced

        def start_masks() -> None:
            if not started and any(p.guide is not None for p in params):
                started.append(GuideMasks(params, logits.shape[-1], self._mask_filler()))

        if prev is not None and any(p.needs_last_token for p in params):
            outputs += self._read(prev, start_masks)  # while the device runs this step's forward
            prev.read = True
        start_masks()
        masks = started[0] if started else None
        histories = [s.output_ids if s.sampling.penalised else [] for s in sampled]
        flight = _InFlight(
            partial(sample_async, logits, params, histories, [s.num_output for s in sampled],
                    masks=masks)
        )  # fmt: skip
        if masks is None:
            self._sampled(flight)
        for row, seq in enumerate(sampled):
            if seq.finish_reason is not None:  # ended by the token just read
                flight.rows.append((seq, _DROPPED, False))
                continue
            seq.token_ids.append(PENDING)
            seq.num_pending += 1
            seq.pending_row = row
            p = seq.sampling
            final = seq.num_output >= p.max_new_tokens or len(seq) >= self.cfg.session_len
            if final:  # out of the schedule now; blocks and output go when the token is read
                self.seqs.pop(seq.seq_id, None)
                self.scheduler.finish(seq, "length", free=False)
            flight.rows.append((seq, len(seq) - 1, final))
        return flight

    def _mask_filler(self) -> ThreadPoolExecutor | None:
        """The thread that fills guided rows' masks while this one goes on; None without
        asynchronous scheduling, where a step's tokens are read as soon as it is launched."""
        if not self.cfg.async_scheduling:
            return None
        if self._mask_worker is None:
            self._mask_worker = ThreadPoolExecutor(1, thread_name_prefix="vlmdeploy-masks")
        return self._mask_worker

    def _sampled(self, flight: _InFlight) -> SampleResult:
        """The step's sampling, queued now if it was not yet (its tokens then go to the other
        ranks); what queuing it raised is raised again on every call."""
        if flight.result is None:
            if flight.error is not None:
                raise flight.error
            try:
                flight.result = flight.sample()
            except Exception as exc:
                flight.error = exc
                raise
            self.executor.share_tokens(flight.result.tokens)
        return flight.result

    def _read(
        self, flight: _InFlight, advanced: Callable[[], None] | None = None
    ) -> list[StepOutput]:
        """Read a launched step's tokens and turn them into outputs (eos and stop ids end a
        request here; a later step's pending token of that request is dropped). The grammars
        take their tokens first, then ``advanced`` is called (the next step's masks start
        filling) and the outputs are made."""
        try:
            tokens, logprobs = self._sampled(flight).resolve()
        except Exception as exc:  # noqa: BLE001 — fatal ones are raised again
            if _fatal(exc):
                raise
            logger.exception("sampling a step failed; ending its requests")
            message = f"the engine failed ({type(exc).__name__}) sampling this request's token"
            return [self._fail(seq, message) for seq, index, _ in flight.rows
                    if not _gone(seq, index)]  # fmt: skip
        refused = set()  # requests whose grammar refused their token
        for (seq, index, _), token in zip(flight.rows, tokens):
            guide = seq.sampling.guide
            if guide is None or token == NON_FINITE or _gone(seq, index):
                continue
            if not guide.advance(token):
                refused.add(seq.seq_id)
        if advanced is not None:
            advanced()
        outputs = []
        for (seq, index, final), token, lp in zip(flight.rows, tokens, logprobs):
            if _gone(seq, index):
                continue
            if token == NON_FINITE:
                message = "the model produced non-finite logits (NaN or inf) for this request"
                outputs.append(self._fail(seq, message))
                continue
            if seq.seq_id in refused:
                outputs.append(self._fail(seq, "the output left its response_format's grammar"))
                continue
            seq.num_pending -= 1
            seq.token_ids[index] = token
            self.blocks.commit(seq)  # a block that ended in this token can be registered now
            reason = "length" if final else None
            if token in seq.sampling.stop_token_ids:  # masked until min_new_tokens is reached
                reason = "stop"
                del seq.token_ids[index + 1 :]
                seq.num_pending = 0
                if seq.status == Status.FINISHED:  # a later step had already ended it on length
                    seq.finish_reason = reason
                    self.blocks.free_seq(seq)
                else:
                    self.seqs.pop(seq.seq_id, None)
                    self.scheduler.finish(seq, reason)
            elif final:
                self.blocks.free_seq(seq)
            outputs.append(
                StepOutput(
                    seq.seq_id,
                    token,
                    lp,
                    reason,
                    seq.num_prompt_tokens,
                    index + 1 - seq.num_prompt_tokens,
                    seq.num_cached,
                )
            )
        return outputs

    def _fail_step(self, batch: ScheduledBatch, exc: Exception) -> list[StepOutput]:
        """A step's launch raised: end the requests it touched with an error and keep serving the
        others. Out of memory is the expected case (a large image batch or prefill on a full
        device): the failed step's memory is given back first. A CUDA error leaves the device
        unusable, and failures in a row mean the engine itself is broken: those are raised, and
        the loop fails every request and reports the engine dead."""
        self._failed_steps += 1
        oom = isinstance(exc, torch.OutOfMemoryError)
        # Under tensor parallelism the other ranks may be anywhere in the failed step: no step
        # after it can be trusted to line up.
        if _fatal(exc) or self._failed_steps >= MAX_FAILED_STEPS or self.executor.distributed:
            raise exc
        logger.exception("a step failed; ending its %d request(s)", len(batch.seqs))
        if oom and self.cfg.device.type == "cuda":
            torch.cuda.empty_cache()
        what = "ran out of device memory" if oom else f"failed ({type(exc).__name__})"
        message = f"the engine {what} in a step with this request; it was dropped"
        return [self._fail(seq, message) for seq in batch.seqs if seq.finish_reason is None]

    def _fail(self, seq: Sequence, message: str) -> StepOutput:
        """End ``seq`` with an error and give its blocks back (a token of it still in flight is
        dropped when read)."""
        num_output = max(0, seq.num_known - seq.num_prompt_tokens)
        if seq.status == Status.FINISHED:  # ended on length at launch: it still held its blocks
            seq.finish_reason = "error"
            self.blocks.free_seq(seq)
        else:
            self.seqs.pop(seq.seq_id, None)
            self.scheduler.finish(seq, "error")
        seq.num_pending = 0
        return StepOutput(
            seq.seq_id, None, None, "error", seq.num_prompt_tokens, num_output, seq.num_cached,
            error=message,
        )

    def _output(self, seq: Sequence, token: int | None, logprobs) -> StepOutput:
        return StepOutput(
            seq.seq_id,
            token,
            logprobs,
            seq.finish_reason if seq.status == Status.FINISHED else None,
            seq.num_prompt_tokens,
            seq.num_output - seq.num_pending,
            seq.num_cached,
        )
