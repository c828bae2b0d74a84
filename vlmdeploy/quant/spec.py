"""Which weight quantisation a model runs with: the checkpoint's ``quantization_config`` and the
user's ``model_format`` resolved into one frozen :class:`WeightQuant`.

* A checkpoint that holds quantised weights says so in ``config.json`` and is loaded as it is:
  blocked FP8 (``quant_method: fp8``, ``weight_block_size: [128, 128]``, dynamic activation
  scales; Qwen3-FP8's and DeepSeek-V3's layout) or AWQ (``quant_method: awq``, 4 bits, zero
  points, ``version: gemm``; what AutoAWQ and LMDeploy's ``lite auto_awq`` write).
  ``model_format`` may be left unset (or ``'hf'``) for either.
* ``model_format='fp8'`` on a full-precision checkpoint quantises the weights while they load.
* ``model_format='awq'`` needs an AWQ checkpoint: 4-bit weights without calibration would lose
  accuracy silently, so none are made on load.

Only dense Qwen3 language models take quantised weights so far; the experts of Qwen3-MoE and
GPT-OSS are refused with a message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vlmdeploy.config import ModelConfig

FP8_BLOCK = (128, 128)


class UnsupportedQuantization(ValueError):
    pass


@dataclass(frozen=True)
class WeightQuant:
    """How the language model's attention and MLP projections hold their weights."""

    method: str  # "fp8": blocked FP8 weights and activations; "awq": 4-bit weights, 16-bit acts
    block: tuple[int, int] = FP8_BLOCK  # fp8: rows × columns of a weight block with one scale
    group_size: int = 128  # awq: inputs that share a zero point and a scale
    stored: bool = False  # the checkpoint holds the quantised tensors (else: quantised on load)


def from_quantization_config(qc: dict[str, Any]) -> WeightQuant | None:
    """The quantisation ``config.json``'s ``quantization_config`` describes; None for GPT-OSS's
    MXFP4 experts, which the loader dequantises. Anything else is refused, naming what."""
    method = str(qc.get("quant_method", "")).lower()
    if method == "fp8":
        return _fp8(qc)
    if method == "awq":
        return _awq(qc)
    if method == "mxfp4":
        return None
    raise UnsupportedQuantization(
        f"quantization_config quant_method {method!r} is not supported: vlmdeploy loads blocked "
        "FP8 (quant_method 'fp8', weight_block_size [128, 128]) and AWQ (quant_method 'awq', "
        "4-bit, version 'gemm') checkpoints"
    )


def _fp8(qc: dict[str, Any]) -> WeightQuant:
    block = qc.get("weight_block_size")
    if block is None or tuple(block) != FP8_BLOCK:
        raise UnsupportedQuantization(
            f"FP8 checkpoint with weight_block_size {block}: only 128 x 128 blocks (one scale "
            "each, weight_scale_inv) are supported, not per-tensor or other block sizes"
        )
    if str(qc.get("activation_scheme", "dynamic")).lower() != "dynamic":
        raise UnsupportedQuantization(
            "FP8 checkpoint with static activation scales: only activation_scheme 'dynamic' "
            "(activations quantised per token per group of 128) is supported"
        )
    if str(qc.get("fmt", "e4m3")).lower() != "e4m3":
        raise UnsupportedQuantization(f"FP8 checkpoint in format {qc['fmt']!r}: only e4m3")
    return WeightQuant("fp8", FP8_BLOCK, stored=True)


def _awq(qc: dict[str, Any]) -> WeightQuant:
    bits = qc.get("bits", qc.get("w_bit", 4))
    group = qc.get("group_size", qc.get("q_group_size", 128))
    version = str(qc.get("version", "gemm")).lower()
    if bits != 4 or version != "gemm" or not qc.get("zero_point", True):
        raise UnsupportedQuantization(
            f"AWQ checkpoint with bits={bits}, version={version!r}, "
            f"zero_point={qc.get('zero_point', True)}: only 4-bit GEMM-layout weights with zero "
            "points (AutoAWQ's and LMDeploy's default) are supported"
        )
    if not isinstance(group, int) or group <= 0 or group % 8:
        raise UnsupportedQuantization(
            f"AWQ checkpoint with group_size {group}: a positive multiple of 8 is needed"
        )
    return WeightQuant("awq", group_size=group, stored=True)


def resolve(model_format: str | None, model: ModelConfig) -> WeightQuant | None:
    """The quantisation to run ``model`` with under the user's ``model_format`` (None or ``'hf'``:
    whatever the checkpoint holds). Raises when the two do not go together or the model cannot
    take quantised weights."""
    stored = model.quantization
    if model_format in (None, "hf"):
        quant = stored
    elif model_format == "fp8":
        if stored is not None and stored.method != "fp8":
            raise ValueError(
                f"model_format='fp8', but the checkpoint's weights are {stored.method.upper()}-"
                "quantised (config.json quantization_config): leave model_format unset to load "
                "them as they are"
            )
        quant = stored or WeightQuant("fp8")  # a full-precision checkpoint: quantised on load
    elif model_format == "awq":
        if stored is None or stored.method != "awq":
            raise ValueError(
                "model_format='awq' needs an AWQ checkpoint (config.json quantization_config "
                "with quant_method 'awq'), as AutoAWQ or `lmdeploy lite auto_awq` write it; "
                "this checkpoint has " + (f"{stored.method} weights" if stored else
                                          "full-precision weights (model_format='fp8' "
                                          "quantises those on load)")
            )
        quant = stored
    else:
        raise ValueError(f"model_format must be None, 'hf', 'fp8' or 'awq', not {model_format!r}")
    if quant is not None and (model.text.is_moe or model.text.is_gpt_oss):
        kind = "GPT-OSS" if model.text.is_gpt_oss else "Qwen3-MoE"
        raise NotImplementedError(
            f"{quant.method.upper()} weights are supported for dense Qwen3 language models only; "
            f"{kind}'s experts cannot run quantised yet (load a bf16 checkpoint without "
            "model_format)"
        )
    return quant
