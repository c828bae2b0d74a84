"""Which quantisation a model runs with: a checkpoint's ``quantization_config`` as Qwen3-FP8,
AutoAWQ and LMDeploy write it, the user's ``model_format`` against it, and the refusals (formats
not built, mismatches, models whose experts cannot take quantised weights)."""

from __future__ import annotations

import dataclasses

import pytest

from vlmdeploy.config import ModelConfig
from vlmdeploy.engine.config import EngineConfig
from vlmdeploy.messages import PytorchEngineConfig, TurbomindEngineConfig
from vlmdeploy.quant.spec import (
    UnsupportedQuantization,
    WeightQuant,
    from_quantization_config,
    resolve,
)

QWEN3_FP8 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
             "weight_block_size": [128, 128]}
AUTOAWQ = {"bits": 4, "group_size": 128, "modules_to_not_convert": None, "quant_method": "awq",
           "version": "gemm", "zero_point": True}


def test_published_configs_parse():
    assert from_quantization_config(QWEN3_FP8) == WeightQuant("fp8", (128, 128), stored=True)
    assert from_quantization_config(AUTOAWQ) == WeightQuant("awq", group_size=128, stored=True)
    assert from_quantization_config({**AUTOAWQ, "group_size": 64}).group_size == 64
    assert from_quantization_config({"quant_method": "mxfp4"}) is None  # GPT-OSS: dequantised


@pytest.mark.parametrize("qc,pattern", [
    ({"quant_method": "gptq", "bits": 4}, "'gptq' is not supported"),
    ({"quant_method": "compressed-tensors"}, "not supported"),
    ({**QWEN3_FP8, "weight_block_size": None}, "per-tensor"),
    ({**QWEN3_FP8, "weight_block_size": [64, 64]}, "128 x 128"),
    ({**QWEN3_FP8, "activation_scheme": "static"}, "static"),
    ({**AUTOAWQ, "bits": 8}, "bits=8"),
    ({**AUTOAWQ, "version": "gemv"}, "gemv"),
    ({**AUTOAWQ, "zero_point": False}, "zero_point=False"),
    ({**AUTOAWQ, "group_size": -1}, "group_size -1"),
])
def test_unsupported_configs_are_refused_naming_why(qc, pattern):
    with pytest.raises(UnsupportedQuantization, match=pattern):
        from_quantization_config(qc)


def with_quant(cfg: ModelConfig, quant: WeightQuant | None, **text) -> ModelConfig:
    return dataclasses.replace(cfg, quantization=quant,
                               text=dataclasses.replace(cfg.text, **text))


def test_model_format_against_the_checkpoint(tiny_ckpts):
    plain = ModelConfig.from_pretrained(tiny_ckpts["hf"])
    fp8 = with_quant(plain, WeightQuant("fp8", stored=True))
    awq = with_quant(plain, WeightQuant("awq", group_size=64, stored=True))
    assert resolve(None, plain) is None and resolve("hf", plain) is None
    assert resolve("fp8", plain) == WeightQuant("fp8", stored=False)  # quantised on load
    for fmt in (None, "hf", "fp8"):
        assert resolve(fmt, fp8) == fp8.quantization  # found in config.json
    for fmt in (None, "hf", "awq"):
        assert resolve(fmt, awq) == awq.quantization
    with pytest.raises(ValueError, match="needs an AWQ checkpoint.*full-precision"):
        resolve("awq", plain)
    with pytest.raises(ValueError, match="needs an AWQ checkpoint.*fp8 weights"):
        resolve("awq", fp8)
    with pytest.raises(ValueError, match="AWQ-quantised"):
        resolve("fp8", awq)


def test_experts_refuse_quantised_weights(tiny_ckpts):
    plain = ModelConfig.from_pretrained(tiny_ckpts["hf"])
    moe = with_quant(plain, None, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48)
    with pytest.raises(NotImplementedError, match="Qwen3-MoE"):
        resolve("fp8", moe)
    with pytest.raises(NotImplementedError, match="Qwen3-MoE"):
        resolve(None, with_quant(moe, WeightQuant("awq", stored=True)))
    assert resolve(None, moe) is None
    with pytest.raises(NotImplementedError, match="GPT-OSS"):
        resolve("fp8", with_quant(plain, None, model_type="gpt_oss"))


def test_user_config_validates_model_format():
    for fmt in (None, "hf", "fp8", "awq"):
        assert PytorchEngineConfig(model_format=fmt).model_format == fmt
    with pytest.raises(NotImplementedError, match=r"model_format='gptq' is not supported"):
        PytorchEngineConfig(model_format="gptq")
    with pytest.raises(ValueError, match="model_format must be"):
        PytorchEngineConfig(model_format="int4")
    assert TurbomindEngineConfig(model_format="awq").to_pytorch().model_format == "awq"


def test_engine_config_resolves_the_format_and_sends_it_to_workers(tiny_ckpts):
    model = ModelConfig.from_pretrained(tiny_ckpts["hf"])
    cfg = EngineConfig.build(PytorchEngineConfig(model_format="fp8", device_type="cpu"), model,
                             tiny_ckpts["hf"], 1)
    assert cfg.weight_format == "fp8" and cfg.weight_quant == WeightQuant("fp8")
    again = EngineConfig.from_json(cfg.to_json(), model, cfg.device)
    assert again == cfg and again.weight_quant == cfg.weight_quant
    assert EngineConfig.build(PytorchEngineConfig(device_type="cpu"), model, tiny_ckpts["hf"],
                              1).weight_quant is None
    with pytest.raises(ValueError, match="AWQ checkpoint"):
        EngineConfig.build(PytorchEngineConfig(model_format="awq", device_type="cpu"), model,
                           tiny_ckpts["hf"], 1)
