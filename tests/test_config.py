"""``ModelConfig`` parsing of both checkpoint formats, written out by hand here from the published
InternVL3.5-8B shapes (DESIGN §3), and the errors for what is not supported."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from vlmdeploy.config import ModelConfig, UnsupportedModelError


def qwen3_8b(**extra: Any) -> dict[str, Any]:
    """Qwen3-8B's language-model block, transformers v4 style (rope_theta + rope_scaling null)."""
    cfg = {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "attention_bias": False,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "max_position_embeddings": 40960,
        "num_attention_heads": 32,
        "num_hidden_layers": 36,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-6,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "vocab_size": 151936,
    }
    cfg.update(extra)
    return cfg


def vit_300m_original() -> dict[str, Any]:
    return {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "hidden_act": "gelu",
        "hidden_size": 1024,
        "image_size": 448,
        "intermediate_size": 4096,
        "layer_norm_eps": 1e-6,
        "norm_type": "layer_norm",
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "qk_normalization": False,
        "qkv_bias": True,
    }


def vit_6b_original() -> dict[str, Any]:
    v = vit_300m_original()
    v.update(
        hidden_size=3200,
        num_hidden_layers=45,
        num_attention_heads=25,
        intermediate_size=12800,
        norm_type="rms_norm",
        qk_normalization=True,
        qkv_bias=False,
    )
    return v


def original(llm: dict[str, Any] | None = None, vision: dict | None = None, **top: Any) -> dict:
    cfg = {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "downsample_ratio": 0.5,
        "force_image_size": 448,
        "llm_config": llm or qwen3_8b(),
        "max_dynamic_patch": 12,
        "min_dynamic_patch": 1,
        "ps_version": "v2",
        "select_layer": -1,
        "torch_dtype": "bfloat16",
        "use_thumbnail": True,
        "vision_config": vision or vit_300m_original(),
    }
    cfg.update(top)
    return cfg


def vit_hf(six_b: bool = False) -> dict[str, Any]:
    v = {
        "model_type": "internvl_vision",
        "attention_bias": True,
        "hidden_act": "gelu",
        "hidden_size": 1024,
        "image_size": [448, 448],
        "intermediate_size": 4096,
        "layer_norm_eps": 1e-6,
        "norm_type": "layer_norm",
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "patch_size": [14, 14],
        "use_mean_pooling": True,
        "use_qk_norm": False,
    }
    if six_b:
        v.update(
            hidden_size=3200,
            num_hidden_layers=45,
            num_attention_heads=25,
            intermediate_size=12800,
            norm_type="rms_norm",
            use_qk_norm=True,
            attention_bias=False,
        )
    return v


def hf(text: dict[str, Any] | None = None, vision: dict | None = None, **top: Any) -> dict:
    cfg = {
        "architectures": ["InternVLForConditionalGeneration"],
        "model_type": "internvl",
        "downsample_ratio": 0.5,
        "image_token_id": 151671,
        "projector_hidden_act": "gelu",
        "text_config": text or qwen3_8b(),
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "vision_config": vision or vit_hf(),
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
    }
    cfg.update(top)
    return cfg


def v5_rope(text: dict[str, Any], theta: float) -> dict[str, Any]:
    """The same block as transformers v5 writes it: rope fields folded into rope_parameters."""
    text = {k: v for k, v in text.items() if k not in ("rope_theta", "rope_scaling")}
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    return text


def check_8b_text(cfg: ModelConfig) -> None:
    t = cfg.text
    assert (t.hidden_size, t.num_layers, t.num_heads, t.num_kv_heads) == (4096, 36, 32, 8)
    assert (t.head_dim, t.intermediate_size, t.vocab_size) == (128, 12288, 151936)
    assert t.rms_norm_eps == 1e-6 and t.rope_theta == 1e6 and not t.tie_word_embeddings


def check_300m(cfg: ModelConfig) -> None:
    v = cfg.vision
    assert (v.hidden_size, v.num_layers, v.num_heads, v.intermediate_size) == (1024, 24, 16, 4096)
    assert (v.image_size, v.patch_size, v.head_dim, v.num_patches) == (448, 14, 64, 1024)
    assert v.qkv_bias and not v.qk_norm and v.norm_type == "layer_norm" and v.norm_eps == 1e-6


def test_original_format():
    cfg = ModelConfig.from_dict(original())
    assert cfg.checkpoint_format == "original"
    check_8b_text(cfg)
    check_300m(cfg)
    assert cfg.tokens_per_tile == 256 and cfg.projector_in == 4096
    assert (cfg.max_dynamic_patch, cfg.min_dynamic_patch, cfg.use_thumbnail) == (12, 1, True)
    assert cfg.select_layer == -1 and cfg.torch_dtype == "bfloat16"


def test_original_format_reads_tiling_fields():
    cfg = ModelConfig.from_dict(
        original(max_dynamic_patch=6, min_dynamic_patch=2, use_thumbnail=False)
    )
    assert (cfg.max_dynamic_patch, cfg.min_dynamic_patch, cfg.use_thumbnail) == (6, 2, False)


@pytest.mark.parametrize("style", ["v4", "v5"])
def test_hf_format_rope_styles(style: str):
    text = qwen3_8b(rope_theta=5e5)
    if style == "v5":
        text = v5_rope(text, 5e5)
    cfg = ModelConfig.from_dict(hf(text))
    assert cfg.checkpoint_format == "hf"
    assert cfg.text.rope_theta == 5e5
    assert cfg.text.head_dim == 128 and cfg.text.num_kv_heads == 8
    check_300m(cfg)
    assert cfg.tokens_per_tile == 256 and cfg.select_layer == -1


def test_v5_rope_without_top_level_theta_uses_rope_parameters():
    text = v5_rope(qwen3_8b(), 1e6)
    assert "rope_theta" not in text
    assert ModelConfig.from_dict(original(llm=text)).text.rope_theta == 1e6


def test_internvit_6b_original():
    v = ModelConfig.from_dict(original(vision=vit_6b_original())).vision
    assert (v.hidden_size, v.num_layers, v.num_heads, v.head_dim) == (3200, 45, 25, 128)
    assert v.norm_type == "rms_norm" and v.qk_norm and not v.qkv_bias


def test_internvit_6b_hf():
    v = ModelConfig.from_dict(hf(vision=vit_hf(six_b=True))).vision
    assert (v.hidden_size, v.num_layers, v.num_heads, v.head_dim) == (3200, 45, 25, 128)
    assert v.norm_type == "rms_norm" and v.qk_norm and not v.qkv_bias


def test_hf_and_original_parse_to_the_same_shapes():
    a, b = ModelConfig.from_dict(original()), ModelConfig.from_dict(hf())
    assert a.text == b.text and a.vision == b.vision


SUPPORTED_WORDS = ("InternVLChatModel", "InternVLForConditionalGeneration", "Qwen3")


def llama() -> dict[str, Any]:
    return qwen3_8b(architectures=["LlamaForCausalLM"], model_type="llama")


def qwen3_moe(**extra: Any) -> dict[str, Any]:
    return qwen3_8b(
        architectures=["Qwen3MoeForCausalLM"],
        model_type="qwen3_moe",
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
        **extra,
    )


def qwen2() -> dict[str, Any]:  # InternVL3 (not 3.5) pairs InternViT with Qwen2.5
    return qwen3_8b(architectures=["Qwen2ForCausalLM"], model_type="qwen2")


@pytest.mark.parametrize(
    "cfg",
    [
        original(llm=llama()),
        hf(text=qwen2()),
        {
            "architectures": ["LlavaForConditionalGeneration"],
            "model_type": "llava",
            "text_config": qwen3_8b(),
            "vision_config": {},
        },
        {"architectures": ["Qwen3ForCausalLM"], **qwen3_8b()},
        {"model_type": "something_new"},
    ],
    ids=[
        "llama",
        "hf-qwen2",
        "llava",
        "bare-llm",
        "unknown",
    ],
)
def test_unsupported_model_names_what_is_supported(cfg: dict):
    with pytest.raises(UnsupportedModelError) as err:
        ModelConfig.from_dict(cfg)
    assert any(word in str(err.value) for word in SUPPORTED_WORDS), str(err.value)


def test_qwen3_moe_parses_in_both_formats():
    a = ModelConfig.from_dict(original(llm=qwen3_moe(mlp_only_layers=[0], norm_topk_prob=True)))
    b = ModelConfig.from_dict(hf(text=qwen3_moe(mlp_only_layers=[0], norm_topk_prob=True)))
    assert a.text == b.text
    t = a.text
    assert (t.num_experts, t.num_experts_per_tok, t.moe_intermediate_size) == (128, 8, 768)
    assert t.is_moe and t.norm_topk_prob and t.mlp_only_layers == (0,)
    assert [t.is_sparse_layer(i) for i in range(3)] == [False, True, True]
    stepped = ModelConfig.from_dict(hf(text=qwen3_moe(decoder_sparse_step=2))).text
    assert [stepped.is_sparse_layer(i) for i in range(4)] == [False, True, False, True]
    assert not stepped.norm_topk_prob  # transformers' default when the key is absent
    dense = ModelConfig.from_dict(original()).text
    assert not dense.is_moe and not dense.is_sparse_layer(0)
    v5 = qwen3_moe(num_local_experts=16)  # transformers 5 writes the count under this name
    del v5["num_experts"]
    assert ModelConfig.from_dict(hf(text=v5)).text.num_experts == 16


def test_gpt_oss_parses_in_both_formats():
    """GPT-OSS (InternVL3.5-GPT-OSS-20B-A4B): the fields transformers' GptOssConfig writes, its
    defaults where absent (YaRN, alternating sliding/full layers from sliding)."""
    llm = qwen3_8b(architectures=["GptOssForCausalLM"], model_type="gpt_oss",
                   num_local_experts=32, num_experts_per_tok=4, sliding_window=128,
                   attention_bias=True)
    a, b = (ModelConfig.from_dict(c).text for c in (original(llm=llm), hf(text=llm)))
    assert a == b and a.is_gpt_oss and a.attention_bias
    assert (a.num_experts, a.num_experts_per_tok) == (32, 4)
    assert a.layer_window(0) == 128 and a.layer_window(1) is None
    assert a.rope_scaling.factor == 32.0 and a.rope_scaling.truncate is False
    assert not original().get("llm_config", {}).get("layer_types")
    with pytest.raises(UnsupportedModelError, match="rope_type"):
        ModelConfig.from_dict(hf(text={**llm, "rope_scaling": {"rope_type": "longrope"}}))


@pytest.mark.parametrize("key", ["attention_bias", "use_sliding_window"])
def test_qwen3_options_we_do_not_implement_are_refused(key: str):
    with pytest.raises(UnsupportedModelError, match=key):
        ModelConfig.from_dict(original(llm=qwen3_8b(**{key: True})))


@pytest.mark.parametrize(
    "text",
    [
        qwen3_8b(
            rope_scaling={
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 32768,
            }
        ),
        qwen3_8b(rope_scaling={"type": "dynamic", "factor": 2.0}),
        {
            **v5_rope(qwen3_8b(), 1e6),
            "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
        },
    ],
    ids=["v4-yarn", "v4-legacy-type-key", "v5-linear"],
)
def test_unsupported_rope_scaling_is_a_clear_error(text: dict):
    with pytest.raises(UnsupportedModelError, match=r"rope_type .*(yarn|dynamic|linear)"):
        ModelConfig.from_dict(hf(text))


def test_pixel_shuffle_v1_is_refused():
    with pytest.raises(UnsupportedModelError, match="ps_version"):
        ModelConfig.from_dict(original(ps_version="v1"))


# ---- from_pretrained: -HF tiling limits live in preprocessor_config.json


def write_dir(root: Path, config: dict, preprocessor: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config))
    if preprocessor is not None:
        (root / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return root


def got_ocr2_processor(**fields: Any) -> dict[str, Any]:
    base = {
        "image_processor_type": "GotOcr2ImageProcessorFast",
        "crop_to_patches": True,
        "max_patches": 12,
        "min_patches": 1,
        "size": {"height": 448, "width": 448},
    }
    return {**base, **fields}


def test_hf_checkpoint_reads_patch_limits_from_preprocessor_config(tmp_path: Path):
    path = write_dir(tmp_path, hf(), got_ocr2_processor(max_patches=6, min_patches=2))
    cfg = ModelConfig.from_pretrained(path)
    assert (cfg.max_dynamic_patch, cfg.min_dynamic_patch) == (6, 2)


def test_hf_crop_to_patches_false_still_tiles_like_internvl_processor(tmp_path: Path):
    # InternVLProcessor always passes crop_to_patches=True to its image processor.
    path = write_dir(tmp_path, hf(), got_ocr2_processor(crop_to_patches=False, max_patches=24))
    assert ModelConfig.from_pretrained(path).max_dynamic_patch == 24


def test_hf_checkpoint_without_preprocessor_keeps_defaults(tmp_path: Path):
    cfg = ModelConfig.from_pretrained(write_dir(tmp_path, hf()))
    assert (cfg.max_dynamic_patch, cfg.min_dynamic_patch) == (12, 1)


def test_original_checkpoint_ignores_preprocessor_config(tmp_path: Path):
    path = write_dir(tmp_path, original(max_dynamic_patch=4), got_ocr2_processor(max_patches=9))
    assert ModelConfig.from_pretrained(path).max_dynamic_patch == 4


def test_bad_patch_limits_are_refused(tmp_path: Path):
    path = write_dir(tmp_path, hf(), got_ocr2_processor(max_patches=2, min_patches=3))
    with pytest.raises(ValueError, match="min_patches"):
        ModelConfig.from_pretrained(path)


def test_tiny_checkpoints_parse_alike(tiny_ckpts: dict[str, str]):
    cfgs = {k: ModelConfig.from_pretrained(v) for k, v in tiny_ckpts.items()}
    assert cfgs["original"].text == cfgs["hf"].text == cfgs["hf-legacy"].text
    assert cfgs["original"].vision == cfgs["hf"].vision
    assert cfgs["6b-original"].vision == cfgs["6b-hf"].vision
    assert cfgs["6b-hf"].vision.norm_type == "rms_norm" and cfgs["6b-hf"].vision.qk_norm


def test_missing_config_json(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_pretrained(tmp_path)


def test_from_dict_does_not_modify_its_input():
    cfg = hf(v5_rope(qwen3_8b(), 1e6))
    before = copy.deepcopy(cfg)
    ModelConfig.from_dict(cfg)
    assert cfg == before
