"""Model configuration parsed from a checkpoint's ``config.json``, for both InternVL checkpoint
formats.

* original (``InternVLChatModel``): ``llm_config`` + ``vision_config`` + top-level tiling fields;
* transformers-native (``InternVLForConditionalGeneration``): ``text_config`` + ``vision_config``,
  with the rope fields of transformers v4 (``rope_theta``/``rope_scaling``) or v5
  (``rope_parameters``); its tiling limits come from ``preprocessor_config.json``.

Every value the model needs is read here once; the rest of the code sees only these frozen
dataclasses.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmdeploy.quant.spec import WeightQuant, from_quantization_config

SUPPORTED_ARCHITECTURES = ("InternVLChatModel", "InternVLForConditionalGeneration")
SUPPORTED_LLMS = ("Qwen3ForCausalLM", "qwen3", "Qwen3MoeForCausalLM", "qwen3_moe")


class UnsupportedModelError(ValueError):
    pass


GPT_OSS_LLMS = ("GptOssForCausalLM", "gpt_oss")


@dataclass(frozen=True)
class YarnScaling:
    """YaRN's RoPE extension as GPT-OSS configures it (``rope_type: yarn``): frequencies between
    ``beta_slow`` and ``beta_fast`` rotations over ``original_max_position_embeddings`` blend
    from interpolated (divided by ``factor``) to original; cos/sin are scaled by
    ``attention_factor`` (None: ``0.1 ln(factor) + 1``). ``truncate`` rounds the blend's bounds
    to whole dimensions (transformers' default when the key is absent)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float | None = None


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    image_size: int = 448
    patch_size: int = 14
    qkv_bias: bool = True
    qk_norm: bool = False
    norm_type: str = "layer_norm"  # or "rms_norm" (InternViT-6B)
    norm_eps: float = 1e-6
    hidden_act: str = "gelu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class TextConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    # Qwen3-MoE (0 experts: a dense model). A layer is sparse unless listed in mlp_only_layers or
    # off the decoder_sparse_step grid; dense layers keep intermediate_size.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    # GPT-OSS (model_type "gpt_oss"): biased q/k/v/o, a sink logit per head, the layers named
    # "sliding_attention" in layer_types attend their last sliding_window keys, YaRN RoPE, a
    # biased top-k router (num_experts, num_experts_per_tok) over clamped-SwiGLU experts of
    # width intermediate_size.
    model_type: str = "qwen3"
    attention_bias: bool = False
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    rope_scaling: YarnScaling | None = None
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0

    @property
    def is_gpt_oss(self) -> bool:
        return self.model_type == "gpt_oss"

    def layer_window(self, layer: int) -> int | None:
        """The attention window of decoder layer ``layer`` (None: it sees the whole context)."""
        if self.layer_types and self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_sparse_layer(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` has a mixture-of-experts MLP (transformers' rule)."""
        return (
            self.is_moe
            and layer not in self.mlp_only_layers
            and (layer + 1) % self.decoder_sparse_step == 0
        )


@dataclass(frozen=True)
class ModelConfig:
    """Everything the engine needs to know about an InternVL3.5 checkpoint."""

    vision: VisionConfig
    text: TextConfig
    checkpoint_format: str  # "original" or "hf"
    downsample_ratio: float = 0.5
    select_layer: int = -1
    projector_norm_eps: float = 1e-5
    max_dynamic_patch: int = 12
    min_dynamic_patch: int = 1
    use_thumbnail: bool = True
    torch_dtype: str = "bfloat16"
    # quantised language-model weights the checkpoint holds (config.json quantization_config)
    quantization: WeightQuant | None = None

    @property
    def tokens_per_tile(self) -> int:
        side = self.vision.image_size // self.vision.patch_size
        return int(side * self.downsample_ratio) ** 2

    @property
    def projector_in(self) -> int:
        return self.vision.hidden_size * int(1 / self.downsample_ratio) ** 2

    @classmethod
    def from_pretrained(cls, model_path: str | Path) -> ModelConfig:
        if not Path(model_path).is_dir():
            raise FileNotFoundError(
                f"{model_path} is not a local checkpoint directory (vlmdeploy loads local "
                "checkpoints only; it does not download models)"
            )
        path = Path(model_path) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in {model_path}")
        cfg = cls.from_dict(json.loads(path.read_text()))
        if cfg.checkpoint_format == "hf":
            cfg = _with_image_processor(cfg, Path(model_path) / "preprocessor_config.json")
        return cfg

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        archs = cfg.get("architectures") or []
        if "llm_config" in cfg:
            return _parse_original(cfg)
        if "text_config" in cfg and cfg.get("model_type") == "internvl":
            return _parse_hf(cfg)
        raise UnsupportedModelError(
            f"unsupported model architecture {archs or cfg.get('model_type')!r}: vlmdeploy "
            f"supports InternVL3.5 checkpoints ({', '.join(SUPPORTED_ARCHITECTURES)}) with a "
            "dense Qwen3 language model"
        )


def _check_llm(llm: dict[str, Any]) -> None:
    archs = llm.get("architectures") or [llm.get("model_type")]
    if not any(a in SUPPORTED_LLMS for a in archs + [llm.get("model_type")]):
        raise UnsupportedModelError(
            f"unsupported language model {archs!r}: vlmdeploy supports Qwen3 "
            "(Qwen3ForCausalLM) and Qwen3-MoE (Qwen3MoeForCausalLM) language models"
        )
    # Options our Qwen3 does not implement would otherwise be dropped silently, changing the math.
    for key in ("attention_bias", "use_sliding_window"):
        if llm.get(key):
            raise UnsupportedModelError(
                f"unsupported language model option {key}=true: vlmdeploy supports dense Qwen3 "
                "without attention bias or sliding-window attention"
            )


def _rope_theta(llm: dict[str, Any]) -> float:
    params = llm.get("rope_parameters") or {}
    scaling = params if params else (llm.get("rope_scaling") or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", None):
        raise UnsupportedModelError(
            f"unsupported rope_type {kind!r}: only 'default' RoPE is supported"
        )
    return float(params.get("rope_theta", llm.get("rope_theta", 10000.0)))


def _is_gpt_oss(llm: dict[str, Any]) -> bool:
    archs = list(llm.get("architectures") or []) + [llm.get("model_type")]
    return any(a in GPT_OSS_LLMS for a in archs)


def _gpt_oss_text_config(llm: dict[str, Any], tie_default: bool) -> TextConfig:
    """GPT-OSS's block (``llm_config`` or ``text_config``); absent keys take transformers'
    ``GptOssConfig`` defaults (those of gpt-oss-20b but its depth and experts)."""
    heads = llm.get("num_attention_heads", 64)
    layers = llm.get("num_hidden_layers", 36)
    types = llm.get("layer_types") or [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)
    ]
    if len(types) != layers or set(types) - {"sliding_attention", "full_attention"}:
        raise UnsupportedModelError(f"unsupported GPT-OSS layer_types {types!r}")
    params = llm.get("rope_parameters") or {}
    scaling = params if "rope_type" in params or "type" in params else llm.get("rope_scaling")
    if not scaling:  # transformers' GptOssConfig fills in gpt-oss's own YaRN
        scaling = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                   "truncate": False, "original_max_position_embeddings": 4096}
    if llm.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError("GPT-OSS experts use their clamped SwiGLU (hidden_act silu)")
    hidden = llm.get("hidden_size", 2880)
    return TextConfig(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=llm.get("num_key_value_heads") or heads,
        head_dim=llm.get("head_dim") or hidden // heads,
        intermediate_size=llm.get("intermediate_size", 2880),
        vocab_size=llm.get("vocab_size", 201088),
        rms_norm_eps=llm.get("rms_norm_eps", 1e-5),
        rope_theta=float(params.get("rope_theta", llm.get("rope_theta", 150000.0))),
        max_position_embeddings=llm.get("max_position_embeddings", 131072),
        tie_word_embeddings=llm.get("tie_word_embeddings", tie_default),
        num_experts=int(llm.get("num_local_experts", llm.get("num_experts", 128))),
        num_experts_per_tok=int(
            llm.get("num_experts_per_tok", llm.get("experts_per_token", 4))
        ),
        moe_intermediate_size=llm.get("intermediate_size", 2880),
        model_type="gpt_oss",
        attention_bias=bool(llm.get("attention_bias", True)),
        layer_types=tuple(types),
        sliding_window=llm.get("sliding_window", 128),
        rope_scaling=_yarn(scaling),
        swiglu_alpha=float(llm.get("swiglu_alpha", 1.702)),
        swiglu_limit=float(llm.get("swiglu_limit", 7.0)),
    )


def _yarn(scaling: dict[str, Any] | None) -> YarnScaling | None:
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind in ("default", None):
        return None
    if kind != "yarn":
        raise UnsupportedModelError(f"unsupported rope_type {kind!r} for GPT-OSS (yarn or default)")
    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
        raise UnsupportedModelError("YaRN with mscale / mscale_all_dim is not supported")
    return YarnScaling(
        factor=float(scaling["factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        beta_fast=float(scaling.get("beta_fast") or 32.0),
        beta_slow=float(scaling.get("beta_slow") or 1.0),
        truncate=bool(scaling.get("truncate", True)),
        attention_factor=scaling.get("attention_factor"),
    )


def _text_config(llm: dict[str, Any], tie_default: bool) -> TextConfig:
    if _is_gpt_oss(llm):
        return _gpt_oss_text_config(llm, tie_default)
    _check_llm(llm)
    heads = llm["num_attention_heads"]
    return TextConfig(
        hidden_size=llm["hidden_size"],
        num_layers=llm["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=llm.get("num_key_value_heads") or heads,
        head_dim=llm.get("head_dim") or llm["hidden_size"] // heads,
        intermediate_size=llm["intermediate_size"],
        vocab_size=llm["vocab_size"],
        rms_norm_eps=llm.get("rms_norm_eps", 1e-6),
        rope_theta=_rope_theta(llm),
        max_position_embeddings=llm.get("max_position_embeddings", 40960),
        tie_word_embeddings=llm.get("tie_word_embeddings", tie_default),
        hidden_act=llm.get("hidden_act", "silu"),
        **_moe_fields(llm),
    )


def _moe_fields(llm: dict[str, Any]) -> dict[str, Any]:
    """Qwen3-MoE's expert fields (none for a dense Qwen3); absent keys take transformers'
    ``Qwen3MoeConfig`` defaults, so both read a config alike."""
    is_moe = llm.get("model_type") == "qwen3_moe" or "Qwen3MoeForCausalLM" in (
        llm.get("architectures") or []
    )
    if not is_moe:
        return {}
    return dict(
        # transformers 5 writes the count as num_local_experts (its attribute map)
        num_experts=int(next((llm[k] for k in ("num_experts", "num_local_experts")
                              if llm.get(k) is not None), 128)),
        num_experts_per_tok=int(llm.get("num_experts_per_tok", 8)),
        moe_intermediate_size=int(llm.get("moe_intermediate_size", 768)),
        norm_topk_prob=bool(llm.get("norm_topk_prob", False)),
        decoder_sparse_step=int(llm.get("decoder_sparse_step", 1)),
        mlp_only_layers=tuple(int(i) for i in llm.get("mlp_only_layers") or ()),
    )


def _image_size(value: Any) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def _parse_original(cfg: dict[str, Any]) -> ModelConfig:
    v = cfg["vision_config"]
    vision = VisionConfig(
        hidden_size=v["hidden_size"],
        num_layers=v["num_hidden_layers"],
        num_heads=v["num_attention_heads"],
        intermediate_size=v["intermediate_size"],
        image_size=_image_size(cfg.get("force_image_size") or v.get("image_size", 448)),
        patch_size=_image_size(v.get("patch_size", 14)),
        qkv_bias=v.get("qkv_bias", True),
        qk_norm=v.get("qk_normalization", False),
        norm_type=v.get("norm_type", "layer_norm"),
        norm_eps=v.get("layer_norm_eps", 1e-6),
        hidden_act=v.get("hidden_act", "gelu"),
    )
    if cfg.get("ps_version", "v2") != "v2":
        raise UnsupportedModelError("only pixel shuffle ps_version 'v2' is supported")
    return ModelConfig(
        vision=vision,
        text=_text_config(cfg["llm_config"], tie_default=False),
        checkpoint_format="original",
        downsample_ratio=cfg.get("downsample_ratio", 0.5),
        select_layer=cfg.get("select_layer", -1),
        max_dynamic_patch=cfg.get("max_dynamic_patch", 12),
        min_dynamic_patch=cfg.get("min_dynamic_patch", 1),
        use_thumbnail=cfg.get("use_thumbnail", True),
        torch_dtype=str(
            cfg.get("torch_dtype") or cfg["llm_config"].get("torch_dtype") or "bfloat16"
        ),
        quantization=_quantization(cfg, cfg["llm_config"]),
    )


def _parse_hf(cfg: dict[str, Any]) -> ModelConfig:
    v = cfg["vision_config"]
    norm = v.get("norm_type", "layer_norm")
    vision = VisionConfig(
        hidden_size=v["hidden_size"],
        num_layers=v["num_hidden_layers"],
        num_heads=v["num_attention_heads"],
        intermediate_size=v["intermediate_size"],
        image_size=_image_size(v.get("image_size", 448)),
        patch_size=_image_size(v.get("patch_size", 14)),
        qkv_bias=v.get("attention_bias", True),
        qk_norm=v.get("use_qk_norm", False),
        norm_type=norm,
        norm_eps=v.get("layer_norm_eps", 1e-6),
        hidden_act=v.get("hidden_act", "gelu"),
    )
    if v.get("use_mean_pooling", True) is False:
        raise UnsupportedModelError(
            "vision towers with a final LayerNorm (use_mean_pooling=false) are not supported"
        )
    layer = cfg.get("vision_feature_layer", -1)
    if cfg.get("vision_feature_select_strategy", "default") != "default":
        raise UnsupportedModelError("only vision_feature_select_strategy 'default' is supported")
    if cfg.get("projector_hidden_act", "gelu") != "gelu":
        raise UnsupportedModelError("only a GELU projector is supported")
    return ModelConfig(
        vision=vision,
        text=_text_config(cfg["text_config"], tie_default=cfg.get("tie_word_embeddings", False)),
        checkpoint_format="hf",
        downsample_ratio=cfg.get("downsample_ratio", 0.5),
        select_layer=layer,
        torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
        quantization=_quantization(cfg, cfg["text_config"]),
    )


def _quantization(cfg: dict[str, Any], llm: dict[str, Any]) -> WeightQuant | None:
    """The checkpoint's ``quantization_config``: at the top (transformers writes it there) or in
    the language model's block."""
    qc = cfg.get("quantization_config") or llm.get("quantization_config")
    return from_quantization_config(qc) if qc else None


def _with_image_processor(cfg: ModelConfig, path: Path) -> ModelConfig:
    """-HF checkpoints keep the tiling limits in ``preprocessor_config.json`` (``max_patches`` /
    ``min_patches``), not in ``config.json``.

    ``crop_to_patches`` is deliberately not read: transformers' ``InternVLProcessor`` passes
    ``crop_to_patches=True`` to its image processor on every call, so the reference pipeline tiles
    even where the file says ``false`` (as some published -HF repos do).
    """
    if not path.is_file():
        return cfg
    proc = json.loads(path.read_text())
    hi = int(proc.get("max_patches", cfg.max_dynamic_patch))
    lo = int(proc.get("min_patches", cfg.min_dynamic_patch))
    if not 1 <= lo <= hi:
        raise ValueError(f"{path.name}: need 1 <= min_patches <= max_patches, got {lo}, {hi}")
    return dataclasses.replace(cfg, max_dynamic_patch=hi, min_dynamic_patch=lo)
