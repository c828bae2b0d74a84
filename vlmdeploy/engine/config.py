"""The engine's one frozen configuration, built once at the boundary from the user's
:class:`~vlmdeploy.messages.PytorchEngineConfig` and the checkpoint's :class:`ModelConfig`.

Below the boundary nothing reads the user's config object: every default is resolved here (device,
dtype, session length, batch size), and the engine's own constants live here as fields with their
reasons, so a reader finds every knob of the engine in one place.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass

import torch

from vlmdeploy.config import ModelConfig
from vlmdeploy.kernels import kv_quant
from vlmdeploy.messages import PytorchEngineConfig
from vlmdeploy.models.tp_plan import local_kv_heads
from vlmdeploy.quant.spec import WeightQuant, resolve

logger = logging.getLogger("vlmdeploy")

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    model_path: str
    image_token_id: int  # <IMG_CONTEXT>: rows that take image embeddings
    device: torch.device
    dtype: torch.dtype  # weights, activations and the KV cache
    session_len: int  # prompt + output tokens of one request
    max_batch_size: int  # sequences per step
    block_size: int  # tokens per KV block
    num_gpu_blocks: int  # 0: planned from free memory
    cache_max_entry_count: float  # share of the memory left after weights and activations
    max_prefill_token_num: int  # new tokens per step
    enable_prefix_caching: bool
    eager_mode: bool  # no CUDA graphs
    async_scheduling: bool  # launch a step before reading the previous step's tokens
    cudagraph_capture_batch_sizes: tuple[int, ...] | None
    load_format: str  # "auto" (the checkpoint) or "dummy" (seeded random weights)
    # The language model's projections: "fp8" or "awq" weights (model_format, or what the
    # checkpoint holds), None for the model's dtype.
    weight_format: str | None = None
    # Tensor parallelism: ranks (one GPU each) and how their worker processes are started
    # ("mp": spawned on this host; "ray": Ray actors, on any host of the cluster).
    tp: int = 1
    executor_backend: str = "mp"
    # KV cache storage (LMDeploy's quant_policy): 0 the dtype, 8 int8, 4 int4 (both with a scale
    # and zero point per token and head), 16 fp8 e4m3; see vlmdeploy/kernels/kv_quant.py.
    quant_policy: int = 0
    # Tiles per vision-encoder call; larger batches are split into calls of warmed sizes.
    max_vision_tiles: int = 64
    # Room left for the CUDA-graph pools (decode and prefill) when sizing the KV cache; the pools
    # take a little under this at 8B (start-up reports it as llm_graphs_mib).
    graph_pool_reserve: int = 1 << 30
    # Image embeddings kept for repeated images (bytes): a few hundred 448-px images at 8B.
    vision_cache_bytes: int = 1 << 30

    @classmethod
    def build(
        cls,
        user: PytorchEngineConfig,
        model: ModelConfig,
        model_path: str,
        image_token_id: int,
    ) -> EngineConfig:
        device = _device(user.device_type)
        cuda = device.type == "cuda"
        return cls(
            model=model,
            model_path=str(model_path),
            image_token_id=image_token_id,
            device=device,
            dtype=_dtype(user.dtype, model, device),
            session_len=user.session_len or model.text.max_position_embeddings,
            max_batch_size=user.max_batch_size or (256 if cuda else 16),
            block_size=user.block_size,
            num_gpu_blocks=user.num_gpu_blocks,
            cache_max_entry_count=user.cache_max_entry_count,
            max_prefill_token_num=user.max_prefill_token_num,
            enable_prefix_caching=user.enable_prefix_caching,
            eager_mode=user.eager_mode,
            async_scheduling=user.async_scheduling,
            cudagraph_capture_batch_sizes=(
                tuple(user.cudagraph_capture_batch_sizes)
                if user.cudagraph_capture_batch_sizes
                else None
            ),
            load_format=user.load_format,
            weight_format=_weight_format(user.model_format, model),
            tp=user.tp,
            executor_backend=_executor_backend(user.distributed_executor_backend, user.tp),
            quant_policy=_quant_policy(user.quant_policy, device),
            vision_cache_bytes=(1 << 30) if cuda else (256 << 20),
        )

    @property
    def weight_quant(self) -> WeightQuant | None:
        """The quantisation of the language model's projections (None: none)."""
        return resolve(self.weight_format, self.model)

    @property
    def max_blocks_per_seq(self) -> int:
        return math.ceil(self.session_len / self.block_size)

    @property
    def use_cuda_graphs(self) -> bool:
        """On CUDA unless ``eager_mode``."""
        return self.device.type == "cuda" and not self.eager_mode

    @property
    def kv_heads_per_rank(self) -> int:
        """KV heads in one rank's cache: split evenly, or one (replicated) when the ranks
        outnumber the heads."""
        return local_kv_heads(self.model.text.num_kv_heads, self.tp)

    @property
    def kv_bytes_per_block(self) -> int:
        """One block of one rank's cache: k and v codes, and their scales and zero points."""
        t = self.model.text
        head = kv_quant.bytes_per_head(self.quant_policy, t.head_dim, self.dtype)
        return 2 * t.num_layers * self.block_size * self.kv_heads_per_rank * head

    # ---- to a worker process and back: plain JSON, no pickle ---------------------------------
    def to_json(self) -> str:
        """Everything but the model's config (a worker reads it from ``model_path``), the device
        (a worker has its own) and the dtype (by name)."""
        fields = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("model", "device", "dtype")
        }
        fields["dtype"] = str(self.dtype).removeprefix("torch.")
        fields["device_type"] = self.device.type
        return json.dumps(fields)

    @classmethod
    def from_json(cls, text: str, model: ModelConfig, device: torch.device) -> EngineConfig:
        fields = json.loads(text)
        fields.pop("device_type")
        fields["dtype"] = _DTYPES[fields["dtype"]]
        sizes = fields["cudagraph_capture_batch_sizes"]
        fields["cudagraph_capture_batch_sizes"] = tuple(sizes) if sizes else None
        return cls(model=model, device=device, **fields)


def _weight_format(model_format: str | None, model: ModelConfig) -> str | None:
    """``model_format`` resolved against the checkpoint: a mismatch is an error here, before
    anything loads."""
    quant = resolve(model_format, model)
    return quant.method if quant is not None else None


def _executor_backend(name: str | None, tp: int) -> str:
    """LMDeploy's names (checked by PytorchEngineConfig): ``mp`` (the default), ``ray``; ``uni``
    (one process) is what tp=1 runs anyway."""
    return "ray" if name == "ray" and tp > 1 else "mp"


def _quant_policy(policy: int, device: torch.device) -> int:
    """fp8 needs the GPU's fp8 conversions (compute capability 8.9: Ada, Hopper and newer); the
    CPU converts in PyTorch."""
    if policy == kv_quant.FP8 and device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise ValueError(
                f"quant_policy=16 (fp8 KV cache) needs a GPU of compute capability 8.9 or newer; "
                f"this one is {major}.{minor}: use quant_policy=8 (int8) or 4 (int4)"
            )
    return int(policy)


def _device(device_type: str) -> torch.device:
    if device_type == "cuda" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if device_type == "cuda":
        # The default device_type is "cuda" (LMDeploy's): on a machine without a GPU the CPU is
        # the expected fallback, said at INFO so a script's stderr stays clean. The CLI refuses
        # an explicit --device cuda without a GPU.
        logger.info("no CUDA device found: running on the CPU (fp32)")
    return torch.device("cpu")


def _dtype(name: str, model: ModelConfig, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    return torch.float16 if model.torch_dtype == "float16" else torch.bfloat16
