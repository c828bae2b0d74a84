"""``GenerationConfig`` / ``PytorchEngineConfig``: LMDeploy's field names and defaults, validation,
and ``NotImplementedError`` for every option that is not implemented."""

from __future__ import annotations

import dataclasses
import enum

import pytest

from vlmdeploy.messages import GenerationConfig, PytorchEngineConfig, Response, VisionConfig

# Field names and defaults of LMDeploy's dataclasses (lmdeploy/messages.py at InternLM/lmdeploy
# commit 1263d5cd, 2026-08-21). Enum defaults are given by member name.
LMDEPLOY_GENERATION = {
    "n": 1,
    "max_new_tokens": 512,
    "do_sample": False,
    "top_p": 1.0,
    "top_k": 50,
    "min_p": 0.0,
    "temperature": 0.8,
    "repetition_penalty": 1.0,
    "ignore_eos": False,
    "random_seed": None,
    "stop_words": None,
    "bad_words": None,
    "stop_token_ids": None,
    "bad_token_ids": None,
    "min_new_tokens": None,
    "skip_special_tokens": True,
    "spaces_between_special_tokens": True,
    "logprobs": None,
    "response_format": None,
    "logits_processors": None,
    "output_logits": None,
    "output_last_hidden_state": None,
    "include_stop_str_in_output": False,
    "return_ppl": False,
    "with_cache": False,
    "preserve_cache": False,
    "migration_request": None,
    "return_routed_experts": False,
    "repetition_ngram_size": 0,
    "repetition_ngram_threshold": 0,
}
LMDEPLOY_PYTORCH_ENGINE = {
    "dtype": "auto",
    "tp": 1,
    "dp": 1,
    "dp_rank": 0,
    "ep": 1,
    "session_len": None,
    "max_batch_size": None,
    "attn_tp_size": None,
    "mlp_tp_size": None,
    "moe_tp_size": None,
    "cache_max_entry_count": 0.8,
    "prefill_interval": 16,
    "block_size": 64,
    "kernel_block_size": -1,
    "num_cpu_blocks": 0,
    "num_gpu_blocks": 0,
    "adapters": None,
    "max_prefill_token_num": 8192,
    "cudagraph_capture_batch_sizes": None,
    "thread_safe": False,
    "enable_prefix_caching": False,
    "prefix_cache_state_budget": 0,
    "prefix_cache_decode_state_interval": 0,
    "device_type": "cuda",
    "eager_mode": False,
    "custom_module_map": None,
    "download_dir": None,
    "revision": None,
    "quant_policy": 0,
    "distributed_executor_backend": None,
    "empty_init": False,
    "enable_microbatch": False,
    "enable_eplb": False,
    "enable_mp_engine": False,
    "mp_engine_backend": "mp",
    "model_format": None,
    "enable_metrics": True,
    "hf_overrides": None,
    "language_model_only": False,
    "logprobs_mode": None,
    "enable_return_routed_experts": False,
    "enable_transfer_obj_ref": False,
    "dllm_block_length": None,
    "dllm_unmasking_strategy": "low_confidence_dynamic",
    "dllm_denoising_steps": None,
    "dllm_confidence_threshold": 0.85,
    "role": "Hybrid",
    "migration_backend": "DLSlime",
}
LMDEPLOY_VISION = {"max_batch_size": 1, "thread_safe": False}
LMDEPLOY_RESPONSE = [
    "text",
    "generate_token_len",
    "input_token_len",
    "finish_reason",
    "token_ids",
    "logprobs",
    "index",
    "cached_tokens",
    "error_message",
]


def defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out[f.name] = value.name if isinstance(value, enum.Enum) else value
    return out


@pytest.mark.parametrize(
    "cls,theirs",
    [
        (GenerationConfig, LMDEPLOY_GENERATION),
        (PytorchEngineConfig, LMDEPLOY_PYTORCH_ENGINE),
        (VisionConfig, LMDEPLOY_VISION),
    ],
)
def test_lmdeploy_fields_exist_with_the_same_defaults(cls, theirs):
    ours = defaults(cls)
    missing = sorted(set(theirs) - set(ours))
    assert not missing, f"{cls.__name__} lacks LMDeploy fields {missing}"
    differ = {k: (ours[k], v) for k, v in theirs.items() if ours[k] != v}
    assert not differ, f"{cls.__name__} defaults differ (ours, LMDeploy's): {differ}"
    # the defaults construct without error
    cls()


def test_response_has_lmdeploys_main_fields():
    names = [f.name for f in dataclasses.fields(Response)]
    assert all(n in names for n in LMDEPLOY_RESPONSE)
    r = Response(text="hi", generate_token_len=1, input_token_len=3)
    assert (r.finish_reason, r.token_ids, r.logprobs, r.index) == (None, [], None, 0)


def test_lmdeploy_style_calls_work():
    gen = GenerationConfig(
        top_k=50,
        top_p=0.95,
        temperature=0.6,
        max_new_tokens=64,
        do_sample=True,
        random_seed=1,
        stop_words=["###"],
        stop_token_ids=[151645],
        min_new_tokens=2,
        logprobs=5,
    )
    assert gen.top_p == 0.95 and gen.stop_words == ["###"]
    eng = PytorchEngineConfig(
        session_len=32768,
        tp=1,
        cache_max_entry_count=0.5,
        max_batch_size=64,
        block_size=64,
        dtype="bfloat16",
    )
    assert eng.session_len == 32768


@pytest.mark.parametrize(
    "kw",
    [
        {"n": 0},
        {"n": 1.0},
        {"max_new_tokens": -1},
        {"max_new_tokens": 10.5},
        {"min_new_tokens": -2},
        {"top_p": 1.5},
        {"top_p": -0.1},
        {"top_k": -1},
        {"top_k": 2.5},
        {"min_p": 2.0},
        {"temperature": -1.0},
        {"temperature": 3.0},
        {"temperature": float("nan")},
        {"repetition_penalty": 0.0},
        {"presence_penalty": 3.0},
        {"frequency_penalty": -2.5},
        {"logprobs": -1},
        {"logprobs": 10**6},
        {"logprobs": True},
        {"random_seed": 2**64},
        {"random_seed": "7"},
        {"stop_token_ids": [-1]},
        {"stop_token_ids": 5},
        {"bad_token_ids": ["x"]},
        {"stop_words": "###"},
        {"bad_words": [1]},
    ],
    ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()),
)
def test_invalid_generation_values(kw):
    with pytest.raises(ValueError):
        GenerationConfig(**kw)


@pytest.mark.parametrize(
    "kw",
    [
        {"dtype": "int8"},
        {"session_len": 0},
        {"max_batch_size": 0},
        {"cache_max_entry_count": 0.0},
        {"cache_max_entry_count": 1.0},
        {"block_size": 48},
        {"block_size": 0},
        {"num_gpu_blocks": -1},
        {"max_prefill_token_num": 0},
        {"device_type": "tpu"},
    ],
    ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()),
)
def test_invalid_engine_values(kw):
    with pytest.raises(ValueError):
        PytorchEngineConfig(**kw)


def test_invalid_vision_values():
    with pytest.raises(ValueError):
        VisionConfig(max_batch_size=0)


def test_unknown_field_is_a_type_error():
    with pytest.raises(TypeError):
        GenerationConfig(no_such_field=1)
    with pytest.raises(TypeError):
        PytorchEngineConfig(no_such_field=1)


GEN_UNIMPLEMENTED = {
    "n": 2,
    "logits_processors": [lambda ids, logits: logits],
    "output_logits": "all",
    "output_last_hidden_state": "generation",
    "return_ppl": True,
    "with_cache": True,
    "preserve_cache": True,
    "migration_request": object(),
    "return_routed_experts": True,
}


@pytest.mark.parametrize("name", sorted(GEN_UNIMPLEMENTED))
def test_unimplemented_generation_fields_raise_naming_the_field(name):
    with pytest.raises(NotImplementedError, match=rf"\b{name}\b"):
        GenerationConfig(**{name: GEN_UNIMPLEMENTED[name]})


def test_repetition_ngram_stop():
    # both set: not implemented; one of them unset: off, as LMDeploy treats it
    with pytest.raises(NotImplementedError, match="repetition_ngram"):
        GenerationConfig(repetition_ngram_size=3, repetition_ngram_threshold=4)
    cfg = GenerationConfig(repetition_ngram_size=3)
    assert (cfg.repetition_ngram_size, cfg.repetition_ngram_threshold) == (0, 0)


ENGINE_UNIMPLEMENTED = {
    "dp": 2,
    "dp_rank": 1,
    "ep": 2,
    "attn_tp_size": 2,
    "mlp_tp_size": 2,
    "moe_tp_size": 2,
    "num_cpu_blocks": 16,
    "adapters": {"a": "/x"},
    "kernel_block_size": 16,
    "prefix_cache_state_budget": 1,
    "prefix_cache_decode_state_interval": 64,
    "custom_module_map": {"a": "b"},
    "empty_init": True,
    "enable_microbatch": True,
    "enable_eplb": True,
    "enable_mp_engine": True,
    "model_format": "gptq",
    "hf_overrides": {"x": 1},
    "logprobs_mode": "raw_logprobs",
    "enable_return_routed_experts": True,
    "enable_transfer_obj_ref": True,
    "dllm_block_length": 4,
    "dllm_unmasking_strategy": "sequential",
    "dllm_denoising_steps": 8,
    "dllm_confidence_threshold": 0.5,
}


@pytest.mark.parametrize("name", sorted(ENGINE_UNIMPLEMENTED))
def test_unimplemented_engine_fields_raise_naming_the_field(name):
    with pytest.raises(NotImplementedError, match=rf"\b{name}\b"):
        PytorchEngineConfig(**{name: ENGINE_UNIMPLEMENTED[name]})


def test_non_default_role_and_migration_backend_raise():
    from vlmdeploy.messages import EngineRole, MigrationBackend

    with pytest.raises(NotImplementedError, match="role"):
        PytorchEngineConfig(role=EngineRole.Prefill)
    with pytest.raises(NotImplementedError, match="migration_backend"):
        PytorchEngineConfig(migration_backend=MigrationBackend.Mooncake)


@pytest.mark.parametrize("policy", [0, 4, 8, 16])
def test_lmdeploy_kv_cache_policies_are_accepted(policy):
    assert PytorchEngineConfig(quant_policy=policy).quant_policy == policy


@pytest.mark.parametrize("policy", [1, 2, 17, 42, -8, 8.0, True, "8"])
def test_other_quant_policies_are_refused_naming_lmdeploys(policy):
    with pytest.raises(ValueError, match=r"quant_policy must be .* 0 \(none\), 4 \(int4\), 8 "
                                         r"\(int8\) or 16 \(fp8 e4m3\)"):
        PytorchEngineConfig(quant_policy=policy)


def test_tp_1_and_other_defaults_are_accepted():
    cfg = PytorchEngineConfig(tp=1, dp=1, ep=1, quant_policy=0, kernel_block_size=-1)
    assert cfg.tp == 1


@pytest.mark.parametrize("backend", [None, "mp", "ray"])
def test_tensor_parallel_sizes_and_lmdeploy_executor_names_are_accepted(backend):
    cfg = PytorchEngineConfig(tp=8, distributed_executor_backend=backend)
    assert (cfg.tp, cfg.distributed_executor_backend) == (8, backend)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"tp": 0}, "tp must be"),
        ({"tp": 2.0}, "tp must be"),
        ({"distributed_executor_backend": "slurm"}, "distributed_executor_backend"),
        ({"tp": 2, "distributed_executor_backend": "uni"}, "uni"),
    ],
)
def test_bad_tensor_parallel_settings_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        PytorchEngineConfig(**fields)


def test_greedy_unless_do_sample():
    assert GenerationConfig().do_sample is False
    assert GenerationConfig(temperature=0.0).temperature == 0.0  # allowed, as in LMDeploy
