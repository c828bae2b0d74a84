"""The engine core: load the model, size the KV cache, and run the schedule → encode → forward →
sample loop.

The interface is three calls — :meth:`LLMEngine.add`, :meth:`LLMEngine.abort`,
:meth:`LLMEngine.step` — with plain data in and out, so the core can move into its own process
without a rewrite. Token-level stops (eos and stop ids, ``max_new_tokens``, ``session_len``) are
decided here; text-level stops (stop words) by the front end.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmdeploy.config import ModelConfig
from vlmdeploy.engine.block_manager import BlockManager
from vlmdeploy.engine.cuda_graph import DecodeGraphs
from vlmdeploy.engine.model_runner import ModelRunner
from vlmdeploy.engine.prefill_graphs import PrefillGraphs
from vlmdeploy.engine.sampling import SampleResult, sample_async
from vlmdeploy.engine.scheduler import ScheduledBatch, Scheduler
from vlmdeploy.engine.sequence import PENDING, Sequence, Status
from vlmdeploy.engine.vision import VisionStage
from vlmdeploy.engine.vision_graphs import VisionGraphs
from vlmdeploy.layers.attention import AttentionMetadata, PagedAttention, attention_context
from vlmdeploy.messages import PytorchEngineConfig
from vlmdeploy.models.internvl import InternVLForCausalLM
from vlmdeploy.models.loader import load_weights
from vlmdeploy.vl.tiling import normalize_raw

logger = logging.getLogger("vlmdeploy")

MAX_VISION_TILES = 64  # tiles per vision-encoder call (the vision stage chunks larger batches)
GRAPH_POOL_RESERVE = 1 << 30  # the CUDA-graph pools (decode and prefill): 886 MiB on an H100 at 8B

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class StepOutput:
    seq_id: int
    token_id: int | None  # None when the request ended without a new token (abort)
    logprobs: dict[int, float] | None
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    error: str | None = None  # why the request ended with finish_reason "error"


@dataclass
class StepRecord:
    """One engine step, as :attr:`LLMEngine.trace` records it (host clock, seconds)."""

    start: float
    launched: float  # the step's work is queued on the device (then the previous step is read)
    end: float
    num_decode: int  # sequences computing one token
    num_prefill_tokens: int  # tokens of the sequences computing more than one
    num_tiles: int  # tiles through the vision encoder
    num_waiting: int  # sequences left waiting after the schedule


@dataclass
class _InFlight:
    """A launched step: its sampled tokens (on the device) and, per sampled row, the sequence, the
    index of its ``PENDING`` token and whether that token ends it on length."""

    result: SampleResult
    rows: list[tuple[Sequence, int, bool]]
    wait_for_it: bool  # the next step needs these tokens on the host (penalised sampling)


def resolve_device(cfg: PytorchEngineConfig) -> torch.device:
    if cfg.device_type == "cuda" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if cfg.device_type == "cuda":
        logger.warning("no CUDA device found: running on the CPU (fp32)")
    return torch.device("cpu")


def resolve_dtype(
    cfg: PytorchEngineConfig, model_cfg: ModelConfig, device: torch.device
) -> torch.dtype:
    if cfg.dtype != "auto":
        return _DTYPES[cfg.dtype]
    if device.type == "cpu":
        return torch.float32
    return torch.float16 if model_cfg.torch_dtype == "float16" else torch.bfloat16


def build_model(
    model_path: str | Path,
    model_cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    load_format: str = "auto",
) -> InternVLForCausalLM:
    """Construct on the meta device (no wasted init), materialise on ``device``, fill from the
    checkpoint — or, with ``load_format='dummy'``, with seeded random weights made on the device
    (for sizes too large to write to disk; only config.json and the tokenizer are read)."""
    with torch.device("meta"):
        model = InternVLForCausalLM(model_cfg)
    model = model.to_empty(device=device).to(dtype)
    if load_format == "dummy":
        init_dummy_weights(model)
    else:
        load_weights(model, model_path, progress=True)
    return model.eval()


@torch.no_grad()
def init_dummy_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights that keep activations finite in bf16: matrices ~ N(0, 0.02), norm weights 1,
    biases 0, layer scales 0.1."""
    gen = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("ls1", "ls2"):
            p.fill_(0.1)
        elif leaf == "bias":
            p.zero_()
        elif p.dim() == 1:  # norm weights
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=gen)


class LLMEngine:
    def __init__(
        self,
        model_path: str | Path,
        cfg: PytorchEngineConfig,
        image_token_id: int,
        model_cfg: ModelConfig | None = None,
    ):
        self.cfg = cfg
        self.model_cfg = model_cfg or ModelConfig.from_pretrained(model_path)
        self.device = resolve_device(cfg)
        self.dtype = resolve_dtype(cfg, self.model_cfg, self.device)
        self.session_len = cfg.session_len or self.model_cfg.text.max_position_embeddings
        self.max_batch_size = cfg.max_batch_size or (256 if self.device.type == "cuda" else 16)
        model = build_model(model_path, self.model_cfg, self.dtype, self.device, cfg.load_format)
        num_blocks = cfg.num_gpu_blocks or self._plan_blocks(model)
        self.block_size = cfg.block_size
        self.runner = ModelRunner(
            model,
            self.model_cfg,
            image_token_id,
            num_blocks,
            cfg.block_size,
            self.dtype,
            self.device,
        )
        self.startup: dict[str, float] = {}  # seconds per start-up stage, and graph memory
        if self.device.type == "cuda" and not cfg.eager_mode:
            t0, reserved = time.perf_counter(), torch.cuda.memory_reserved(self.device)
            self._capture_graphs()
            self.startup["llm_graphs_s"] = round(time.perf_counter() - t0, 2)
            grown = torch.cuda.memory_reserved(self.device) - reserved
            self.startup["llm_graphs_mib"] = round(grown / 2**20)
        self.blocks = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, self.max_batch_size, cfg.max_prefill_token_num)
        cache_bytes = (1 << 30) if self.device.type == "cuda" else (256 << 20)
        self.vision = VisionStage(
            self.runner.encode_images,
            max_tiles=MAX_VISION_TILES,
            cache_bytes=cache_bytes,
            pin_memory=self.device.type == "cuda",
        )
        if self.device.type == "cuda":
            size = self.model_cfg.vision.image_size
            if not cfg.eager_mode:
                t0 = time.perf_counter()
                self.runner.vision_graphs = VisionGraphs(
                    self.runner.encode_raw, (size, size, 3), self.device
                )
                self.startup["vision_graphs_s"] = round(time.perf_counter() - t0, 2)
        self.seqs: dict[int, Sequence] = {}
        self._arrivals = 0
        self._inflight: _InFlight | None = None  # the launched step whose tokens are not read yet
        self.trace: list[StepRecord] | None = None  # a list here makes every step append a record

    def warm_up(self) -> None:
        """One encoder call at every tile count the vision stage can batch, on the calling thread,
        which must be the thread that steps the engine (:class:`EngineLoop` does this before it
        takes requests). cuDNN keeps its attention plans per thread: on an H100 a shape's first
        call on a thread costs 60-70 ms, even after the same shape ran on another thread
        (docs/benchmarks.md). About 1 s; nothing to do off CUDA, where a new tile count costs
        nothing extra."""
        if self.device.type != "cuda":
            return
        size = self.model_cfg.vision.image_size
        t0 = time.perf_counter()
        with torch.inference_mode():
            self.vision.warm_up((size, size, 3))
        self.startup["vision_warm_up_s"] = round(time.perf_counter() - t0, 2)

    # ---- capacity --------------------------------------------------------------------------------
    def _kv_bytes_per_block(self) -> int:
        t = self.model_cfg.text
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * t.num_layers * self.cfg.block_size * t.num_kv_heads * t.head_dim * elem

    def _plan_blocks(self, model: torch.nn.Module) -> int:
        per_block = self._kv_bytes_per_block()
        if self.device.type == "cpu":  # enough for max_batch_size full sessions, at most 4 GiB
            want = self.max_batch_size * math.ceil(self.session_len / self.cfg.block_size)
            return max(1, min(want, (4 << 30) // per_block))
        peak = self._profile_activations(model)
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(self.device)
        # LMDeploy's meaning: a fraction of the memory left once weights and the measured
        # activation peak (plus room for CUDA-graph pools) are counted.
        reserve = peak + (0 if self.cfg.eager_mode else GRAPH_POOL_RESERVE)
        return max(1, int((free - reserve) * self.cfg.cache_max_entry_count) // per_block)

    def _profile_activations(self, model: InternVLForCausalLM) -> int:
        """Peak activation bytes of the largest vision batch and the largest prefill step, measured
        by running both once on dummy inputs."""
        dev = self.device
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        kv_bytes = self.profile_step(model)
        torch.cuda.synchronize(dev)
        return max(0, torch.cuda.max_memory_allocated(dev) - base - kv_bytes)

    @torch.inference_mode()
    def profile_step(self, model: InternVLForCausalLM) -> int:
        """One vision batch of ``MAX_VISION_TILES`` tiles and one prefill of the largest step
        (``max_prefill_token_num`` prompt tokens + ``max_batch_size`` decodes) over a temporary KV
        cache; returns that cache's size (it is not an activation)."""
        dev, t, bs = self.device, self.model_cfg.text, self.cfg.block_size
        size = self.model_cfg.vision.image_size
        tiles = torch.zeros(MAX_VISION_TILES, size, size, 3, device=dev, dtype=torch.uint8)
        model.encode_images(normalize_raw(tiles).to(self.dtype))  # as ModelRunner.encode_images
        n = self.cfg.max_prefill_token_num + self.max_batch_size
        blocks = math.ceil(n / bs)
        kv = torch.zeros(
            2, t.num_layers, blocks, bs, t.num_kv_heads, t.head_dim, dtype=self.dtype, device=dev
        )
        layers = [m for m in model.modules() if isinstance(m, PagedAttention)]
        for i, layer in enumerate(layers):
            layer.k_cache, layer.v_cache = kv[0, i], kv[1, i]
        meta = AttentionMetadata(
            slot_mapping=torch.arange(n, device=dev),
            cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32, device=dev),
            kv_lens=torch.tensor([n], dtype=torch.int32, device=dev),
            block_tables=torch.arange(blocks, dtype=torch.int32, device=dev)[None],
            max_q_len=n,
            max_kv_len=n,
        )
        ids = torch.zeros(n, dtype=torch.long, device=dev)
        with attention_context(meta):
            hidden = model(model.embed(ids, None, None), torch.arange(n, device=dev))
        model.compute_logits(hidden[-self.max_batch_size :])  # every decode row samples
        for layer in layers:  # drop the temporary cache so its memory can be given back
            layer.k_cache = layer.v_cache = torch.empty(0)
        return kv.numel() * kv.element_size()

    @property
    def num_blocks(self) -> int:
        return self.blocks.num_blocks

    def check_fits(self, num_prompt_tokens: int, max_new_tokens: int) -> str | None:
        """Why a request cannot run (None if it can)."""
        if num_prompt_tokens >= self.session_len:
            return (
                f"the prompt has {num_prompt_tokens} tokens (image tokens included), which does "
                f"not fit session_len={self.session_len}"
            )
        total = min(num_prompt_tokens + max_new_tokens, self.session_len)
        if math.ceil(total / self.block_size) > self.blocks.num_blocks:
            return (
                f"the request needs {total} tokens of KV cache but the cache holds only "
                f"{self.blocks.num_blocks * self.block_size}"
            )
        return None

    def _capture_graphs(self) -> None:
        from vlmdeploy import kernels

        if kernels.triton_ops_available():  # the reference attention syncs with the host
            self.runner.graphs = DecodeGraphs(
                self.runner.model,
                self.max_batch_size,
                math.ceil(self.session_len / self.cfg.block_size),
                self.runner.scratch_block,
                self.cfg.block_size,
                self.session_len,
                self.device,
                sizes=self.cfg.cudagraph_capture_batch_sizes,
            )
            t = self.model_cfg.text
            self.runner.prefill_graphs = PrefillGraphs(
                self.runner.model,
                t.hidden_size,
                self.dtype,
                math.ceil(self.session_len / self.cfg.block_size),
                self.runner.scratch_block,
                self.cfg.block_size,
                self.device,
                max_tokens=self.cfg.max_prefill_token_num,
            )

    def release(self) -> None:
        """Drop the model and the KV cache so their memory can be reused by another engine."""
        self.runner = None
        self.vision = None
        self.seqs.clear()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- requests --------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if seq.seq_id in self.seqs:
            raise ValueError(f"request id {seq.seq_id} is already in use")
        if not seq.token_ids or seq.sampling.max_new_tokens < 1:
            raise ValueError("a request needs at least one prompt token and one new token")
        reason = self.check_fits(len(seq), seq.sampling.max_new_tokens) or self._check_images(seq)
        if reason:
            raise ValueError(reason)
        if seq.sampling.seed is not None and not seq.sampling.greedy:
            seq.sampling.generator = torch.Generator(self.device).manual_seed(seq.sampling.seed)
        seq.arrival = self._arrivals
        self._arrivals += 1
        self.seqs[seq.seq_id] = seq
        self.scheduler.add(seq)

    def _check_images(self, seq: Sequence) -> str | None:
        """The prompt's image-context tokens must be exactly its images' blocks: any mismatch would
        fail the forward of every request in the step, so it is refused here, for this one."""
        ctx = self.runner.image_token_id
        per_tile = self.model_cfg.tokens_per_tile
        offsets = [im.offset for im in seq.images]
        if offsets != sorted(offsets) or any(
            im.num_tokens % per_tile
            or (im.pixel_values is None and im.tile is None)
            or (im.pixel_values is not None and len(im.pixel_values) * per_tile != im.num_tokens)
            or not im.content_hash
            for im in seq.images
        ):
            return "the request's images are inconsistent with its tokens"
        for im in seq.images:
            block = seq.token_ids[im.offset : im.offset + im.num_tokens]
            if block.count(ctx) != im.num_tokens:  # list.count: C speed on the engine thread
                return "image tokens do not match the request's images"
        if seq.token_ids.count(ctx) != sum(im.num_tokens for im in seq.images):
            return "image tokens do not match the request's images"
        return None

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
        extra token for the request is computed and dropped. Penalised sampling reads the token
        history, so a step with such a request is resolved before the next one is launched."""
        outputs: list[StepOutput] = []
        prev, self._inflight = self._inflight, None
        if prev is not None and prev.wait_for_it:
            outputs += self._resolve(prev)
            prev = None
        start, tiles = time.perf_counter(), self.vision.tiles_encoded
        batch = self.scheduler.schedule()
        if batch:
            self._inflight = self._launch(batch, prev)
        launched = time.perf_counter()
        if prev is not None:
            outputs += self._resolve(prev)
        if self._inflight is not None and not self.cfg.async_scheduling:
            outputs += self._resolve(self._inflight)
            self._inflight = None
        if self.trace is not None:
            decode = sum(1 for n in batch.num_tokens if n == 1)
            self.trace.append(
                StepRecord(
                    start,
                    launched,
                    time.perf_counter(),
                    decode,
                    sum(batch.num_tokens) - decode,
                    self.vision.tiles_encoded - tiles,
                    len(self.scheduler.waiting),
                )
            )
        return outputs

    def _launch(self, batch: ScheduledBatch, prev: _InFlight | None) -> _InFlight | None:
        """Queue the forward and sampling of ``batch`` on the device; decide the stops that do not
        depend on the tokens' values (length) now."""
        self.vision.run(batch.seqs)
        done = [s.num_computed + n == len(s) for s, n in zip(batch.seqs, batch.num_tokens)]
        rows = [i for i, d in enumerate(done) if d]
        # Always runs: mid-prefill chunks must still write KV.
        logits = self.runner.run(batch, rows, None if prev is None else prev.result.tokens)
        for seq, n in zip(batch.seqs, batch.num_tokens):
            seq.num_computed += n
            self.blocks.commit(seq)
            seq.release_image_embeds()
        if not rows:
            return None
        sampled = [batch.seqs[i] for i in rows]
        result = sample_async(
            logits,
            [s.sampling for s in sampled],
            [s.output_ids for s in sampled],
            [s.num_output for s in sampled],
        )
        flight = _InFlight(result, [], any(s.sampling.penalised for s in sampled))
        for row, seq in enumerate(sampled):
            seq.token_ids.append(PENDING)
            seq.num_pending += 1
            seq.pending_row = row
            p = seq.sampling
            final = seq.num_output >= p.max_new_tokens or len(seq) >= self.session_len
            if final:  # out of the schedule now; blocks and output go when the token is read
                self.seqs.pop(seq.seq_id, None)
                self.scheduler.finish(seq, "length", free=False)
            flight.rows.append((seq, len(seq) - 1, final))
        return flight

    def _resolve(self, flight: _InFlight) -> list[StepOutput]:
        """Read a launched step's tokens and turn them into outputs (eos and stop ids end a
        request here; a later step's pending token of that request is dropped)."""
        tokens, logprobs = flight.result.resolve()
        outputs = []
        for (seq, index, final), token, lp in zip(flight.rows, tokens, logprobs):
            if index >= len(seq.token_ids) or seq.finish_reason == "abort":
                continue  # stopped at an earlier token, or aborted
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
