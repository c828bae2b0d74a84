"""Preset shapes against the published InternVL3.5 sizes and transformers' own parameter layout."""

from __future__ import annotations

import pytest
import torch

from vlmdeploy.testing import configs, weights
from vlmdeploy.testing.presets import PRESETS, get_preset

REAL = ['1b', '2b', '4b', '8b', '14b', '38b', '30b-a3b', '241b-a28b']


@pytest.mark.parametrize('name', REAL)
def test_parameter_counts_match_published_sizes(name):
    preset = PRESETS[name]
    counts = preset.param_counts()
    vision, language, total = preset.published
    assert abs(counts['total'] / 1e9 - total) / total < 0.05
    # The published table gives one decimal (billions); the LLM column excludes mlp1.
    assert round(counts['vision'] / 1e9, 1) == vision
    assert round(counts['language'] / 1e9, 1) == language


@pytest.mark.parametrize('name', sorted(PRESETS))
def test_counts_and_names_agree_with_transformers_on_meta(name):
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    preset = PRESETS[name]
    configs.check_against_transformers(preset)  # raises on any name/shape difference
    cfg = configs.hf_config(preset, torch.bfloat16)
    kwargs = {k: v for k, v in cfg.items() if k not in ('architectures', 'model_type')}
    with torch.device('meta'):
        model = InternVLForConditionalGeneration(InternVLConfig(**kwargs))
    assert sum(p.numel() for p in model.parameters()) == preset.param_counts()['total']
    assert sum(s.numel for s in weights.canonical_specs(preset)) == preset.param_counts()['total']


def test_known_shapes():
    eight = PRESETS['8b'].text
    assert (eight.hidden_size, eight.num_hidden_layers, eight.num_attention_heads,
            eight.num_key_value_heads, eight.intermediate_size) == (4096, 36, 32, 8, 12288)
    one = PRESETS['1b'].text
    assert (one.hidden_size, one.num_hidden_layers, one.intermediate_size) == (1024, 28, 3072)
    assert all(not PRESETS[n].text.tie_word_embeddings for n in PRESETS)
    assert all(PRESETS[n].text.vocab_size == 151936 for n in PRESETS)
    for n in ('1b', '2b', '4b', '8b', '14b', 'tiny'):
        v = PRESETS[n].vision
        assert v.norm_type == 'layer_norm' and v.qkv_bias and not v.qk_normalization
    for n in ('38b', 'tiny-6b'):
        v = PRESETS[n].vision
        assert v.norm_type == 'rms_norm' and not v.qkv_bias and v.qk_normalization
    six = PRESETS['38b'].vision
    assert (six.hidden_size, six.num_hidden_layers, six.num_attention_heads,
            six.intermediate_size) == (3200, 45, 25, 12800)


def test_tiny_keeps_real_geometry():
    for name in ('tiny', 'tiny-6b'):
        p = PRESETS[name]
        assert (p.vision.image_size, p.vision.patch_size, p.downsample_ratio) == (448, 14, 0.5)
        assert p.vision.num_patches == 1024 and p.image_tokens_per_tile == 256
        assert p.projector_in == 4 * p.vision.hidden_size
        assert p.param_counts()['total'] < 30_000_000


def test_overrides():
    p = get_preset('8b', text_overrides={'num_hidden_layers': 3})
    assert p.text.num_hidden_layers == 3 and p.text.hidden_size == 4096
    assert p.published is None  # the published size no longer applies
    assert PRESETS['8b'].text.num_hidden_layers == 36  # the registry is untouched
    assert get_preset('8b').published == PRESETS['8b'].published
    with pytest.raises(KeyError):
        get_preset('7b')
    with pytest.raises(TypeError):
        get_preset('tiny', vision_overrides={'no_such_field': 1})


def test_moe_presets():
    for name, layers, hidden, heads, inter in [('30b-a3b', 48, 2048, 32, 768),
                                               ('241b-a28b', 94, 4096, 64, 1536)]:
        t = PRESETS[name].text
        assert (t.num_hidden_layers, t.hidden_size, t.num_attention_heads, t.num_key_value_heads,
                t.num_experts, t.num_experts_per_tok, t.moe_intermediate_size,
                t.norm_topk_prob) == (layers, hidden, heads, 4, 128, 8, inter, True)
        assert all(t.is_sparse_layer(i) for i in range(layers))
    assert PRESETS['241b-a28b'].vision == PRESETS['38b'].vision  # InternViT-6B
    tiny = PRESETS['tiny-moe'].text
    assert [tiny.is_sparse_layer(i) for i in range(3)] == [True, False, True]


@pytest.mark.parametrize('fmt', ['original', 'hf', 'hf-legacy'])
def test_experts_per_expert_or_fused_hold_the_same_values(fmt):
    preset = PRESETS['tiny-moe']
    split = {ft.name: ft for ft in weights.file_tensors(preset, fmt)}
    fused = {ft.name: ft for ft in weights.file_tensors(preset, fmt, fused_experts=True)}
    gate_up = next(n for n in fused if n.endswith('layers.2.mlp.experts.gate_up_proj'))
    down = next(n for n in fused if n.endswith('layers.2.mlp.experts.down_proj'))
    assert fused[gate_up].shape == (8, 96, 64) and fused[down].shape == (8, 64, 48)
    stacked = weights.make_file_tensor(fused[gate_up], 0, True, torch.float32, 'cpu')
    stem = gate_up.removesuffix('gate_up_proj')
    for e in (0, 5):
        parts = [weights.make_file_tensor(split[f'{stem}{e}.{p}_proj.weight'], 0, True,
                                          torch.float32, 'cpu') for p in ('gate', 'up')]
        assert torch.equal(stacked[e], torch.cat(parts))
    assert not any('layers.1.mlp.experts' in n for n in fused)  # the dense layer


def test_gpt_oss_presets():
    """gpt-oss-20b's shape (openai/gpt-oss-20b's config.json) with InternViT-300M; ~20.6B with the
    synthetic tokenizer's vocabulary (gpt-oss-20b itself: 20.9B over 201,088 ids)."""
    big = PRESETS['gpt-oss-20b']
    t = big.text
    assert (t.num_hidden_layers, t.hidden_size, t.num_attention_heads, t.num_key_value_heads,
            t.head_dim, t.num_local_experts, t.num_experts_per_tok, t.intermediate_size,
            t.sliding_window) == (24, 2880, 64, 8, 64, 32, 4, 2880, 128)
    assert big.vision == PRESETS['8b'].vision
    assert t.layer_types[:2] == ['sliding_attention', 'full_attention']
    assert abs(big.param_counts()['language'] / 1e9 - 20.6) < 0.1
    tiny = PRESETS['tiny-gpt-oss'].text
    assert tiny.sliding_window < 16 and tiny.num_hidden_layers == 4
