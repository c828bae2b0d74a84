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
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmdeploy.config import ModelConfig
from vlmdeploy.engine.block_manager import BlockManager
from vlmdeploy.engine.cuda_graph import DecodeGraphs
from vlmdeploy.engine.model_runner import ModelRunner
from vlmdeploy.engine.sampling import sample
from vlmdeploy.engine.scheduler import Scheduler
from vlmdeploy.engine.sequence import Sequence, Status
from vlmdeploy.engine.vision import VisionStage
from vlmdeploy.messages import PytorchEngineConfig
from vlmdeploy.models.internvl import InternVLForCausalLM
from vlmdeploy.models.loader import load_weights

logger = logging.getLogger("vlmdeploy")

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
    model_path: str | Path, model_cfg: ModelConfig, dtype: torch.dtype, device: torch.device
) -> InternVLForCausalLM:
    """Construct on the meta device (no wasted init), materialise on ``device``, fill from the
    checkpoint."""
    with torch.device("meta"):
        model = InternVLForCausalLM(model_cfg)
    model = model.to_empty(device=device).to(dtype)
    load_weights(model, model_path, progress=True)
    return model.eval()


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
        model = build_model(model_path, self.model_cfg, self.dtype, self.device)
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
        if self.device.type == "cuda" and not cfg.eager_mode:
            self._capture_graphs()
        self.blocks = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, self.max_batch_size, cfg.max_prefill_token_num)
        cache_bytes = (1 << 30) if self.device.type == "cuda" else (256 << 20)
        self.vision = VisionStage(self.runner.encode_images, max_tiles=64, cache_bytes=cache_bytes)
        self.seqs: dict[int, Sequence] = {}
        self._arrivals = 0

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
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(self.device)
        reserve = (
            4 << 30
        )  # activations of the largest prefill and vision batch (profiled in a later stage)
        return max(1, int((free - reserve) * self.cfg.cache_max_entry_count) // per_block)

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
        reason = self.check_fits(len(seq), seq.sampling.max_new_tokens)
        if reason:
            raise ValueError(reason)
        if seq.sampling.seed is not None and not seq.sampling.greedy:
            seq.sampling.generator = torch.Generator(self.device).manual_seed(seq.sampling.seed)
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
        return self.scheduler.has_work()

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
        batch = self.scheduler.schedule()
        if not batch:
            return []
        self.vision.run(batch.seqs)
        done = [s.num_computed + n == len(s) for s, n in zip(batch.seqs, batch.num_tokens)]
        rows = [i for i, d in enumerate(done) if d]
        logits = self.runner.run(batch, rows)  # always runs: mid-prefill chunks must still write KV
        for seq, n in zip(batch.seqs, batch.num_tokens):
            seq.num_computed += n
            self.blocks.commit(seq)
        if not rows:
            return []
        sampled = [batch.seqs[i] for i in rows]
        tokens, logprobs = sample(
            logits,
            [s.sampling for s in sampled],
            [s.output_ids for s in sampled],
            [s.num_output for s in sampled],
        )
        return [self._append(s, t, lp) for s, t, lp in zip(sampled, tokens, logprobs)]

    def _append(self, seq: Sequence, token: int, logprobs: dict[int, float] | None) -> StepOutput:
        seq.token_ids.append(token)
        p = seq.sampling
        reason = None
        if token in p.stop_token_ids:  # the sampler masks them until min_new_tokens is reached
            reason = "stop"
        elif seq.num_output >= p.max_new_tokens or len(seq) >= self.session_len:
            reason = "length"
        if reason:
            self.seqs.pop(seq.seq_id, None)
            self.scheduler.finish(seq, reason)
        return self._output(seq, token, logprobs)

    def _output(self, seq: Sequence, token: int | None, logprobs) -> StepOutput:
        return StepOutput(
            seq.seq_id,
            token,
            logprobs,
            seq.finish_reason if seq.status == Status.FINISHED else None,
            seq.num_prompt_tokens,
            seq.num_output,
            seq.num_cached,
        )
