"""The config files of a random-weight InternVL3.5 checkpoint: `config.json` of the original
(`internvl_chat`, with `llm_config` / `vision_config`, no `auto_map`: no remote code) and of the
-HF layout (transformers' `internvl`), the -HF processor files and `generation_config.json`; and a
check that the -HF config builds exactly our parameter layout in transformers.
"""

from __future__ import annotations

from typing import Any

import torch

from vlmdeploy.testing.gpt_oss import GptOssShape
from vlmdeploy.testing.gpt_oss import text_config as gpt_oss_text_config
from vlmdeploy.testing.presets import Preset
from vlmdeploy.testing.weights import file_tensors

BOS_ID, EOS_ID, IMG_CONTEXT_ID = 151643, 151645, 151671


def text_config(preset: Preset, dtype: torch.dtype) -> dict[str, Any]:
    """The Qwen3 (or Qwen3-MoE) block shared by `llm_config` (original) and `text_config`
    (-HF)."""
    t = preset.text
    if isinstance(t, GptOssShape):
        return gpt_oss_text_config(preset, _dtype_name(dtype), BOS_ID, EOS_ID)
    if t.num_experts:
        return {**_qwen3_config(preset, dtype), **_moe_config(preset)}
    return _qwen3_config(preset, dtype)


def _moe_config(preset: Preset) -> dict[str, Any]:
    """What Qwen3-MoE's config.json adds to (and changes in) Qwen3's."""
    t = preset.text
    return {
        'architectures': ['Qwen3MoeForCausalLM'],
        'model_type': 'qwen3_moe',
        'decoder_sparse_step': t.decoder_sparse_step,
        'mlp_only_layers': list(t.mlp_only_layers),
        'moe_intermediate_size': t.moe_intermediate_size,
        'norm_topk_prob': t.norm_topk_prob,
        'num_experts': t.num_experts,
        'num_experts_per_tok': t.num_experts_per_tok,
        'output_router_logits': False,
        'router_aux_loss_coef': 0.001,
    }


def _qwen3_config(preset: Preset, dtype: torch.dtype) -> dict[str, Any]:
    t = preset.text
    return {
        'architectures': ['Qwen3ForCausalLM'],
        'model_type': 'qwen3',
        'attention_bias': False,
        'attention_dropout': 0.0,
        'bos_token_id': BOS_ID,
        'eos_token_id': EOS_ID,
        'head_dim': t.head_dim,
        'hidden_act': 'silu',
        'hidden_size': t.hidden_size,
        'initializer_range': 0.02,
        'intermediate_size': t.intermediate_size,
        'max_position_embeddings': t.max_position_embeddings,
        'max_window_layers': t.num_hidden_layers,
        'num_attention_heads': t.num_attention_heads,
        'num_hidden_layers': t.num_hidden_layers,
        'num_key_value_heads': t.num_key_value_heads,
        'rms_norm_eps': t.rms_norm_eps,
        'rope_scaling': None,
        'rope_theta': t.rope_theta,
        'sliding_window': None,
        'tie_word_embeddings': t.tie_word_embeddings,
        'torch_dtype': _dtype_name(dtype),
        'use_cache': True,
        'use_sliding_window': False,
        'vocab_size': t.vocab_size,
    }


def original_config(preset: Preset, dtype: torch.dtype) -> dict[str, Any]:
    """config.json of the OpenGVLab `InternVLChatModel` layout (without `auto_map`: no code)."""
    v = preset.vision
    vision = {
        'architectures': ['InternVisionModel'],
        'model_type': 'intern_vit_6b',
        'attention_dropout': 0.0,
        'drop_path_rate': 0.0,
        'dropout': 0.0,
        'hidden_act': 'gelu',
        'hidden_size': v.hidden_size,
        'image_size': v.image_size,
        'initializer_factor': 1.0,
        'initializer_range': 0.02,
        'intermediate_size': v.intermediate_size,
        'layer_norm_eps': v.layer_norm_eps,
        'norm_type': v.norm_type,
        'num_attention_heads': v.num_attention_heads,
        'num_channels': v.num_channels,
        'num_hidden_layers': v.num_hidden_layers,
        'patch_size': v.patch_size,
        'qk_normalization': v.qk_normalization,
        'qkv_bias': v.qkv_bias,
        'torch_dtype': _dtype_name(dtype),
        'use_flash_attn': True,
    }
    return {
        'architectures': ['InternVLChatModel'],
        'model_type': 'internvl_chat',
        'downsample_ratio': preset.downsample_ratio,
        'dynamic_image_size': True,
        'force_image_size': v.image_size,
        'llm_config': text_config(preset, dtype),
        'max_dynamic_patch': 12,
        'min_dynamic_patch': 1,
        'pad2square': False,
        'ps_version': 'v2',
        'select_layer': -1,
        'template': 'internvl2_5',
        'tie_word_embeddings': preset.text.tie_word_embeddings,
        'torch_dtype': _dtype_name(dtype),
        'use_backbone_lora': 0,
        'use_llm_lora': 0,
        'use_thumbnail': True,
        'vision_config': vision,
    }


def hf_config(preset: Preset, dtype: torch.dtype) -> dict[str, Any]:
    """config.json of transformers' InternVLForConditionalGeneration (model_type 'internvl')."""
    v = preset.vision
    vision = {
        'model_type': 'internvl_vision',
        'attention_bias': v.qkv_bias,
        'attention_dropout': 0.0,
        'hidden_act': 'gelu',
        'hidden_dropout_prob': 0.0,
        'hidden_size': v.hidden_size,
        'image_size': [v.image_size, v.image_size],
        'initializer_range': 0.02,
        'intermediate_size': v.intermediate_size,
        'layer_norm_eps': v.layer_norm_eps,
        'layer_scale_init_value': 0.1,
        'norm_type': v.norm_type,
        'num_attention_heads': v.num_attention_heads,
        'num_channels': v.num_channels,
        'num_hidden_layers': v.num_hidden_layers,
        'patch_size': [v.patch_size, v.patch_size],
        'projection_dropout': 0.0,
        'torch_dtype': _dtype_name(dtype),
        'use_absolute_position_embeddings': True,
        'use_mask_token': False,
        'use_mean_pooling': True,
        'use_qk_norm': v.qk_normalization,
    }
    return {
        'architectures': ['InternVLForConditionalGeneration'],
        'model_type': 'internvl',
        'downsample_ratio': preset.downsample_ratio,
        'image_seq_length': preset.image_tokens_per_tile,
        'image_token_id': IMG_CONTEXT_ID,
        'projector_hidden_act': 'gelu',
        'text_config': text_config(preset, dtype),
        # InternVLConfig defaults to tied embeddings; InternVL3.5 ships an untied lm_head.
        'tie_word_embeddings': preset.text.tie_word_embeddings,
        'torch_dtype': _dtype_name(dtype),
        'vision_config': vision,
        'vision_feature_layer': -1,
        'vision_feature_select_strategy': 'default',
    }


def processor_files(preset: Preset) -> dict[str, dict[str, Any]]:
    """preprocessor/processor configs transformers' InternVLProcessor loads (-HF only)."""
    size = preset.vision.image_size
    image = {
        'crop_to_patches': True,
        'data_format': 'channels_first',
        'do_convert_rgb': True,
        'do_normalize': True,
        'do_rescale': True,
        'do_resize': True,
        'image_mean': [0.485, 0.456, 0.406],
        'image_processor_type': 'GotOcr2ImageProcessorFast',
        'image_std': [0.229, 0.224, 0.225],
        'max_patches': 12,
        'min_patches': 1,
        'processor_class': 'InternVLProcessor',
        'resample': 3,  # bicubic
        'rescale_factor': 1 / 255,
        'size': {'height': size, 'width': size},
    }
    processor = {'image_seq_length': preset.image_tokens_per_tile,
                 'processor_class': 'InternVLProcessor'}
    return {'preprocessor_config.json': image, 'processor_config.json': processor}


def generation_config() -> dict[str, Any]:
    # Qwen3's stop set: <|im_end|> then <|endoftext|>. No sampling defaults: benchmarks and
    # tests choose their own.
    return {'bos_token_id': BOS_ID, 'eos_token_id': [EOS_ID, BOS_ID], 'pad_token_id': BOS_ID}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix('torch.')


def check_against_transformers(preset: Preset) -> None:
    """Raise if transformers' InternVLForConditionalGeneration has other parameter names/shapes.

    The model is built on the meta device from our -HF config, so nothing is allocated.
    """
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    cfg = hf_config(preset, torch.bfloat16)
    kwargs = {k: v for k, v in cfg.items() if k not in ('architectures', 'model_type')}
    with torch.device('meta'):
        model = InternVLForConditionalGeneration(InternVLConfig(**kwargs))
    theirs = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    # transformers holds experts fused in 3-D (its loader also reads them per expert)
    ours = {ft.name: ft.shape for ft in file_tensors(preset, 'hf', fused_experts=True)}
    if theirs != ours:
        diff = sorted(set(theirs.items()) ^ set(ours.items()))[:10]
        raise RuntimeError(f'parameter layout differs from transformers: {diff}')

