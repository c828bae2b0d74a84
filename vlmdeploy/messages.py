"""User-facing configuration and result types, with LMDeploy's field names and defaults.

A field that LMDeploy has but vlmdeploy does not implement yet may be left at its default; setting
it to anything else raises ``NotImplementedError`` naming the field, so no option is ever silently
ignored.
"""

from __future__ import annotations

import dataclasses
import enum
import numbers
from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length", "error", "abort"]


class EngineRole(enum.Enum):
    """LMDeploy's disaggregated-serving role; vlmdeploy runs ``Hybrid`` engines only."""

    Hybrid = enum.auto()
    Prefill = enum.auto()
    Decode = enum.auto()


class MigrationBackend(enum.Enum):
    """LMDeploy's KV migration backend for disaggregated serving (not implemented)."""

    DLSlime = enum.auto()
    Mooncake = enum.auto()


def _reject_unimplemented(obj: Any, defaults: dict[str, Any]) -> None:
    for name, default in defaults.items():
        value = getattr(obj, name)
        if value != default:
            raise NotImplementedError(
                f"{type(obj).__name__}.{name}={value!r} is not supported by vlmdeploy yet "
                f"(only the default {default!r})"
            )


@dataclass
class GenerationConfig:
    """Sampling and stopping parameters of one request (LMDeploy's ``GenerationConfig``).

    Decoding is greedy unless ``do_sample=True``, exactly as in LMDeploy: with ``do_sample=False``
    the sampling fields (``temperature``, ``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``)
    are ignored.
    """

    n: int = 1
    max_new_tokens: int | None = 512
    do_sample: bool = False
    top_p: float = 1.0
    top_k: int = 50
    min_p: float = 0.0
    temperature: float = 0.8
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    random_seed: int | None = None
    stop_words: list[str] | None = None
    bad_words: list[str] | None = None
    stop_token_ids: list[int] | None = None
    bad_token_ids: list[int] | None = None
    min_new_tokens: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logprobs: int | None = None
    response_format: dict | None = None
    logits_processors: list | None = None
    output_logits: Literal["all", "generation"] | None = None
    output_last_hidden_state: Literal["all", "generation"] | None = None
    include_stop_str_in_output: bool = False
    return_ppl: bool = False
    with_cache: bool = False
    preserve_cache: bool = False
    migration_request: Any = None
    return_routed_experts: bool = False
    repetition_ngram_size: int = 0
    repetition_ngram_threshold: int = 0
    # OpenAI's additive penalties (not in LMDeploy's GenerationConfig; used by the HTTP server).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    _UNIMPLEMENTED = {
        "n": 1,  # LMDeploy's pipeline serves one choice too; the HTTP server fans out ``n``
        "logits_processors": None,
        "output_logits": None,
        "output_last_hidden_state": None,
        "return_ppl": False,
        "with_cache": False,
        "preserve_cache": False,
        "migration_request": None,
        "return_routed_experts": False,
        "repetition_ngram_size": 0,
        "repetition_ngram_threshold": 0,
        "spaces_between_special_tokens": True,
    }

    def __post_init__(self) -> None:
        _check(type(self.n) is int and 1 <= self.n, "n must be a positive integer")
        _check(_optional_int(self.max_new_tokens, 0), "max_new_tokens must be an integer >= 0")
        _check(_optional_int(self.min_new_tokens, 0), "min_new_tokens must be an integer >= 0")
        _check(0.0 <= self.top_p <= 1.0, "top_p must be in [0, 1]")
        _check(_is_int(self.top_k) and self.top_k >= 0, "top_k must be an integer >= 0")
        _check(0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]")
        _check(0.0 <= self.temperature <= 2.0, "temperature must be in [0, 2]")
        _check(self.repetition_penalty > 0.0, "repetition_penalty must be > 0")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]")
        _check(
            _optional_int(self.logprobs, 0) and (self.logprobs or 0) <= 1024,
            "logprobs must be an integer in [0, 1024]",
        )
        _check(
            _optional_int(self.random_seed, -(2**63)) and (self.random_seed or 0) < 2**64,
            "random_seed must be an integer in [-2**63, 2**64)",
        )
        for name in ("stop_token_ids", "bad_token_ids"):
            ids = getattr(self, name)
            _check(
                ids is None or (isinstance(ids, list) and all(_optional_int(i, 0) for i in ids)),
                f"{name} must be a list of token ids (integers >= 0)",
            )
        for name in ("stop_words", "bad_words"):
            words = getattr(self, name)
            _check(
                words is None
                or (isinstance(words, list) and all(isinstance(w, str) for w in words)),
                f"{name} must be a list of strings",
            )
        if self.repetition_ngram_size <= 0 or self.repetition_ngram_threshold <= 0:
            # LMDeploy treats an incomplete n-gram stop setting as off
            self.repetition_ngram_size = self.repetition_ngram_threshold = 0
        _reject_unimplemented(self, self._UNIMPLEMENTED)


@dataclass
class PytorchEngineConfig:
    """Engine parameters (LMDeploy's ``PytorchEngineConfig``).

    ``cache_max_entry_count`` is the fraction of free GPU memory given to the KV cache after the
    weights and the activation peak are counted; ``num_gpu_blocks > 0`` fixes the number of KV
    blocks instead (used on CPU and in tests).
    """

    dtype: str = "auto"
    tp: int = 1
    dp: int = 1
    dp_rank: int = 0
    ep: int = 1
    session_len: int | None = None
    max_batch_size: int | None = None
    attn_tp_size: int | None = None
    mlp_tp_size: int | None = None
    moe_tp_size: int | None = None
    cache_max_entry_count: float = 0.8
    prefill_interval: int = 16
    block_size: int = 64
    kernel_block_size: int = -1
    num_cpu_blocks: int = 0
    num_gpu_blocks: int = 0
    adapters: dict[str, str] | None = None
    max_prefill_token_num: int = 8192
    cudagraph_capture_batch_sizes: list[int] | None = None
    thread_safe: bool = False
    enable_prefix_caching: bool = False
    prefix_cache_state_budget: int = 0
    prefix_cache_decode_state_interval: int = 0
    device_type: str = "cuda"
    eager_mode: bool = False
    # vlmdeploy: launch each step before reading the previous step's tokens (the GPU never waits
    # for the host); False reads every step's tokens before the next is scheduled.
    async_scheduling: bool = True
    custom_module_map: dict[str, str] | None = None
    download_dir: str | None = None
    revision: str | None = None
    quant_policy: int = 0
    distributed_executor_backend: str | None = None
    empty_init: bool = False
    enable_microbatch: bool = False
    enable_eplb: bool = False
    enable_mp_engine: bool = False
    mp_engine_backend: str = "mp"
    model_format: str | None = None
    enable_metrics: bool = True
    hf_overrides: dict[str, Any] | None = None
    language_model_only: bool = False
    logprobs_mode: str | None = None
    enable_return_routed_experts: bool = False
    enable_transfer_obj_ref: bool = False
    dllm_block_length: int | None = None
    dllm_unmasking_strategy: str = "low_confidence_dynamic"
    dllm_denoising_steps: int | None = None
    dllm_confidence_threshold: float = 0.85
    role: EngineRole = EngineRole.Hybrid
    migration_backend: MigrationBackend = MigrationBackend.DLSlime

    # vlmdeploy's own: "auto" reads safetensors; "dummy" makes seeded random weights on the device
    # (benchmarks of sizes too large to write to disk; needs only config.json and the tokenizer).
    load_format: str = "auto"

    _UNIMPLEMENTED = {
        "dp": 1,
        "dp_rank": 0,
        "ep": 1,
        "attn_tp_size": None,
        "mlp_tp_size": None,
        "moe_tp_size": None,
        "num_cpu_blocks": 0,
        "adapters": None,
        "kernel_block_size": -1,
        "prefix_cache_state_budget": 0,
        "prefix_cache_decode_state_interval": 0,
        "custom_module_map": None,
        "empty_init": False,
        "enable_microbatch": False,
        "enable_eplb": False,
        "enable_mp_engine": False,
        "hf_overrides": None,
        "logprobs_mode": None,
        "enable_return_routed_experts": False,
        "enable_transfer_obj_ref": False,
        "dllm_block_length": None,
        "dllm_unmasking_strategy": "low_confidence_dynamic",
        "dllm_denoising_steps": None,
        "dllm_confidence_threshold": 0.85,
        "role": EngineRole.Hybrid,
        "migration_backend": MigrationBackend.DLSlime,
        "prefill_interval": 16,  # the scheduler mixes prefill chunks into every step instead
        "thread_safe": False,
        "mp_engine_backend": "mp",
        "enable_metrics": True,  # the HTTP server always exports metrics
        "language_model_only": False,
    }

    def __post_init__(self) -> None:
        _check(
            self.dtype in ("auto", "float16", "bfloat16", "float32"),
            "dtype must be one of auto, float16, bfloat16, float32",
        )
        _check(self.session_len is None or self.session_len > 0, "session_len must be > 0")
        _check(self.max_batch_size is None or self.max_batch_size > 0, "max_batch_size must be > 0")
        _check(0.0 < self.cache_max_entry_count < 1.0, "cache_max_entry_count must be in (0, 1)")
        _check(
            self.block_size > 0 and self.block_size & (self.block_size - 1) == 0,
            "block_size must be a power of two",
        )
        _check(self.num_gpu_blocks >= 0, "num_gpu_blocks must be >= 0")
        _check(self.max_prefill_token_num > 0, "max_prefill_token_num must be > 0")
        _check(self.device_type in ("cuda", "cpu"), "device_type must be 'cuda' or 'cpu'")
        _check(self.load_format in ("auto", "dummy"), "load_format must be 'auto' or 'dummy'")
        _check_model_format(self.model_format)
        _check(
            _is_int(self.quant_policy) and self.quant_policy in (0, 4, 8, 16),
            "quant_policy must be one of LMDeploy's KV cache policies 0 (none), 4 (int4), "
            f"8 (int8) or 16 (fp8 e4m3), not {self.quant_policy!r}",
        )
        _check(type(self.tp) is int and self.tp >= 1, "tp must be an integer >= 1")
        _check(
            self.distributed_executor_backend in (None, "mp", "ray", "uni"),
            "distributed_executor_backend must be 'mp', 'ray' or 'uni'",
        )
        _check(
            self.distributed_executor_backend != "uni" or self.tp == 1,
            "distributed_executor_backend='uni' runs one process: it needs tp=1",
        )
        _reject_unimplemented(self, self._UNIMPLEMENTED)


@dataclass
class TurbomindEngineConfig:
    """LMDeploy's ``TurbomindEngineConfig`` (its fields and defaults), run on vlmdeploy's engine.

    vlmdeploy has one engine. A script that passes this config gets it mapped onto
    :class:`PytorchEngineConfig` by :meth:`to_pytorch`: the fields both engines share carry over
    (``cache_block_seq_len`` becomes ``block_size``, ``async_`` needs no counterpart); a
    TurboMind-only field set to anything but its default raises ``NotImplementedError`` naming it,
    and a shared field vlmdeploy does not implement raises as it does in ``PytorchEngineConfig``.
    """

    dtype: str = "auto"
    gemm_input_dtype: str | None = None
    model_format: str | None = None
    tp: int = 1
    dp: int = 1
    cp: int = 1
    ep: int = 1
    device_num: int | None = None
    attn_tp_size: int | None = None
    attn_cp_size: int | None = None
    attn_dp_size: int | None = None
    mlp_tp_size: int | None = None
    mlp_dp_size: int | None = None
    outer_dp_size: int | None = None
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None
    devices: list[int] | None = None
    session_len: int | None = None
    max_batch_size: int | None = None
    cache_max_entry_count: float = 0.8
    cache_chunk_size: int = -1
    cache_block_seq_len: int = 64
    enable_prefix_caching: bool = False
    cache_checkpoint_interval: int = 4096
    cache_prompt: str = "auto"
    cache_prompt_boundary_skip: int = 1
    cache_generation: str = "auto"
    quant_policy: int = 0
    rope_scaling_factor: float = 0.0
    use_logn_attn: bool = False
    download_dir: str | None = None
    revision: str | None = None
    max_prefill_token_num: int = 8192
    num_tokens_per_iter: int = 0
    max_prefill_iters: int = 1
    async_: int = 1
    empty_init: bool = False
    language_model_only: bool = False
    communicator: str = "nccl"
    moe_a2a_backend: str = "auto"
    hf_overrides: dict[str, Any] | None = None
    enable_metrics: bool = True

    # fields both engines have (TurboMind's name -> PytorchEngineConfig's)
    _SHARED = {
        "dtype": "dtype", "model_format": "model_format", "tp": "tp", "dp": "dp", "ep": "ep",
        "session_len": "session_len", "max_batch_size": "max_batch_size",
        "cache_max_entry_count": "cache_max_entry_count", "cache_block_seq_len": "block_size",
        "enable_prefix_caching": "enable_prefix_caching", "quant_policy": "quant_policy",
        "download_dir": "download_dir", "revision": "revision",
        "max_prefill_token_num": "max_prefill_token_num", "empty_init": "empty_init",
        "language_model_only": "language_model_only", "hf_overrides": "hf_overrides",
        "attn_tp_size": "attn_tp_size", "mlp_tp_size": "mlp_tp_size",
    }
    # TurboMind scheduling and communication knobs: vlmdeploy's engine needs none of them, so any
    # value is accepted (they change speed, never results)
    _TUNING = ("num_tokens_per_iter", "max_prefill_iters", "async_", "communicator",
               "moe_a2a_backend", "cache_chunk_size", "cache_checkpoint_interval",
               "cache_prompt", "cache_prompt_boundary_skip", "cache_generation", "enable_metrics",
               "gemm_input_dtype")

    def to_pytorch(self) -> PytorchEngineConfig:
        """The same settings as a :class:`PytorchEngineConfig`."""
        defaults = TurbomindEngineConfig()
        for f in dataclasses.fields(self):
            if f.name in self._SHARED or f.name in self._TUNING:
                continue
            value = getattr(self, f.name)
            if value != getattr(defaults, f.name):
                raise NotImplementedError(
                    f"TurbomindEngineConfig.{f.name}={value!r} is a TurboMind engine option "
                    "that vlmdeploy's engine does not have (only the default "
                    f"{getattr(defaults, f.name)!r})")
        values = {ours: getattr(self, theirs) for theirs, ours in self._SHARED.items()}
        if values["model_format"] == "hf":
            values["model_format"] = None
        return PytorchEngineConfig(**values)


@dataclass
class VisionConfig:
    """Vision-stage parameters (LMDeploy's ``VisionConfig``)."""

    max_batch_size: int = 1
    thread_safe: bool = False

    def __post_init__(self) -> None:
        _check(self.max_batch_size > 0, "max_batch_size must be > 0")


@dataclass
class Response:
    """The result of one prompt (LMDeploy's ``Response``)."""

    text: str
    generate_token_len: int
    input_token_len: int
    finish_reason: FinishReason | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    index: int = 0
    cached_tokens: int = 0
    error_message: str | None = None

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if f.name != "token_ids"
        )
        return f"Response({fields})"


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_model_format(value: Any) -> None:
    """LMDeploy's ``model_format``: None or ``hf`` (the checkpoint's own weights, quantised ones
    included), ``fp8`` (quantised on load unless stored so), ``awq`` (an AWQ checkpoint)."""
    if value in (None, "hf", "fp8", "awq"):
        return
    if value in ("gptq", "mxfp4", "compressed-tensors"):  # LMDeploy's others
        raise NotImplementedError(
            f"PytorchEngineConfig.model_format={value!r} is not supported by vlmdeploy "
            "(only None or 'hf', 'fp8' and 'awq')"
        )
    raise ValueError(f"model_format must be None, 'hf', 'fp8' or 'awq', not {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _optional_int(value: Any, minimum: int) -> bool:
    """None, or an integer >= ``minimum`` (a float or bool would fail later, in the engine)."""
    return value is None or (_is_int(value) and value >= minimum)
