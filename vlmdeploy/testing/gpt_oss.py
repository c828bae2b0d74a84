"""GPT-OSS as the language model of a random-weight checkpoint: its shape, its tensors under the
names transformers' ``GptOssForCausalLM`` gives them, its ``config.json`` block, and its
parameter count. :mod:`vlmdeploy.testing.presets`, ``weights`` and ``configs`` dispatch here
when a preset's ``text`` is a :class:`GptOssShape`.

Tensors (per layer ``i`` under ``model.language_model.layers.i.``): ``self_attn.{q,k,v,o}_proj.
{weight,bias}``, ``self_attn.sinks`` (Hq,), ``mlp.router.{weight,bias}`` (E, H) / (E,),
``mlp.experts.gate_up_proj`` (E, H, 2I) with gate and up interleaved along the last dimension,
``mlp.experts.gate_up_proj_bias`` (E, 2I), ``mlp.experts.down_proj`` (E, I, H),
``mlp.experts.down_proj_bias`` (E, H), ``input_layernorm`` / ``post_attention_layernorm``. The
original layout holds the same under ``language_model.model.`` (InternVLChatModel wraps
transformers' GPT-OSS). Written in bf16/fp32; MXFP4 (``*_blocks`` / ``*_scales``) is not written.

Source of the numbers (``gpt-oss-20b``): openai/gpt-oss-20b's config.json — 24 layers, hidden 2880,
64 heads of 64, 8 KV heads, 32 experts top-4 of width 2880, sliding window 128 on even layers,
YaRN (factor 32 over 4096 positions, beta 32/1, theta 150000, not truncated), RMSNorm eps 1e-5.
The vocabulary is the synthetic tokenizer's (151936), which covers every id it can sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vlmdeploy.testing.presets import Preset
    from vlmdeploy.testing.weights import TensorSpec

VOCAB_SIZE = 151936


@dataclass(frozen=True)
class GptOssShape:
    """GPT-OSS decoder."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    num_local_experts: int
    num_experts_per_tok: int
    head_dim: int = 64
    vocab_size: int = VOCAB_SIZE
    sliding_window: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 150000.0
    rope_factor: float = 32.0
    original_max_position_embeddings: int = 4096
    max_position_embeddings: int = 131072
    swiglu_limit: float = 7.0
    tie_word_embeddings: bool = False

    @property
    def layer_types(self) -> list[str]:
        return ['sliding_attention' if i % 2 == 0 else 'full_attention'
                for i in range(self.num_hidden_layers)]


def text_specs(t: GptOssShape) -> list[TensorSpec]:
    from vlmdeploy.testing.weights import TensorSpec

    h, e, f = t.hidden_size, t.num_local_experts, t.intermediate_size
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    lm = 'model.language_model.'
    out = [TensorSpec(lm + 'embed_tokens.weight', (t.vocab_size, h), 'normal')]
    for i in range(t.num_hidden_layers):
        a, m = f'{lm}layers.{i}.self_attn.', f'{lm}layers.{i}.mlp.'
        for proj, rows in (('q_proj', q), ('k_proj', kv), ('v_proj', kv)):
            out += [TensorSpec(f'{a}{proj}.weight', (rows, h), 'normal'),
                    TensorSpec(f'{a}{proj}.bias', (rows,), 'bias')]
        out += [TensorSpec(a + 'o_proj.weight', (h, q), 'normal'),
                TensorSpec(a + 'o_proj.bias', (h,), 'bias'),
                TensorSpec(a + 'sinks', (t.num_attention_heads,), 'bias'),
                TensorSpec(m + 'router.weight', (e, h), 'normal'),
                TensorSpec(m + 'router.bias', (e,), 'bias'),
                TensorSpec(m + 'experts.gate_up_proj', (e, h, 2 * f), 'normal'),
                TensorSpec(m + 'experts.gate_up_proj_bias', (e, 2 * f), 'bias'),
                TensorSpec(m + 'experts.down_proj', (e, f, h), 'normal'),
                TensorSpec(m + 'experts.down_proj_bias', (e, h), 'bias'),
                TensorSpec(f'{lm}layers.{i}.input_layernorm.weight', (h,), 'norm'),
                TensorSpec(f'{lm}layers.{i}.post_attention_layernorm.weight', (h,), 'norm')]
    out.append(TensorSpec(lm + 'norm.weight', (h,), 'norm'))
    if not t.tie_word_embeddings:
        out.append(TensorSpec('lm_head.weight', (t.vocab_size, h), 'normal'))
    return out


def text_params(t: GptOssShape) -> int:
    h, e, f, d = t.hidden_size, t.num_local_experts, t.intermediate_size, t.head_dim
    q, kv = t.num_attention_heads * d, t.num_key_value_heads * d
    attn = h * (q + 2 * kv) + (q + 2 * kv) + q * h + h + t.num_attention_heads
    moe = e * h + e + e * (h * 2 * f + 2 * f + f * h + h)
    heads = 1 if t.tie_word_embeddings else 2
    return heads * t.vocab_size * h + t.num_hidden_layers * (attn + moe + 2 * h) + h


def text_config(preset: Preset, dtype_name: str, bos_id: int, eos_id: int) -> dict[str, Any]:
    """The GPT-OSS block of `llm_config` (original) and `text_config` (-HF): what
    transformers' GptOssConfig writes (v4 rope keys, which v5 also reads)."""
    t = preset.text
    return {
        'architectures': ['GptOssForCausalLM'],
        'model_type': 'gpt_oss',
        'attention_bias': True,
        'attention_dropout': 0.0,
        'bos_token_id': bos_id,
        'eos_token_id': eos_id,
        'head_dim': t.head_dim,
        'hidden_act': 'silu',
        'hidden_size': t.hidden_size,
        'initializer_range': 0.02,
        'intermediate_size': t.intermediate_size,
        'layer_types': t.layer_types,
        'max_position_embeddings': t.max_position_embeddings,
        'num_attention_heads': t.num_attention_heads,
        'num_experts_per_tok': t.num_experts_per_tok,
        'num_hidden_layers': t.num_hidden_layers,
        'num_key_value_heads': t.num_key_value_heads,
        'num_local_experts': t.num_local_experts,
        'rms_norm_eps': t.rms_norm_eps,
        'rope_scaling': {'rope_type': 'yarn', 'factor': t.rope_factor, 'beta_fast': 32.0,
                         'beta_slow': 1.0, 'truncate': False,
                         'original_max_position_embeddings': t.original_max_position_embeddings},
        'rope_theta': t.rope_theta,
        'router_aux_loss_coef': 0.9,
        'sliding_window': t.sliding_window,
        'swiglu_limit': t.swiglu_limit,
        'tie_word_embeddings': t.tie_word_embeddings,
        'torch_dtype': dtype_name,
        'use_cache': True,
        'vocab_size': t.vocab_size,
    }
