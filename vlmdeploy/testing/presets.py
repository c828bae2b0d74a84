"""Shapes of every dense InternVL3.5 size, plus tiny CPU-test variants.

A `Preset` is pure data: the vision tower (`VisionShape`), the language model (`TextShape`) and the
pixel-shuffle ratio between them. `get_preset(name, vision_overrides=..., text_overrides=...)`
returns a preset with any field replaced, e.g. `text_overrides={'num_hidden_layers': 3}`.
`Preset.param_counts()` computes parameter counts from the shapes alone (nothing is allocated).

Sources of the numbers:
- Qwen3 language models: the `config.json` of Qwen/Qwen3-{0.6B,1.7B,4B,8B,14B,32B} (hidden,
  intermediate, layers, heads, kv heads; head_dim 128, rope theta 1e6, RMSNorm eps 1e-6, vocab
  151936, max positions 40960). Qwen3-0.6B/1.7B/4B tie their embeddings, but every InternVL3.5
  size ships an untied `lm_head`, so `tie_word_embeddings` is False here for all of them.
- InternViT-300M-448px-V2.5 and InternViT-6B-448px-V2.5: the `vision_config` blocks of the
  OpenGVLab InternVL checkpoints (`qkv_bias`, `qk_normalization`, `norm_type`, eps 1e-6) and
  `modeling_intern_vit.py` of OpenGVLab/InternVL (qkv fused, layer scale `ls1/ls2`, q/k RMSNorm
  over the whole width).
- Published sizes (`Preset.published`, billions: vision, language, total): the model table of
  the InternVL3.5 quick-start page (InternVL docs, `internvl3.5/quick_start.md`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from vlmdeploy.testing.gpt_oss import GptOssShape, text_params

VOCAB_SIZE = 151936
IMAGE_SIZE = 448
PATCH_SIZE = 14


@dataclass(frozen=True)
class VisionShape:
    """InternViT tower. `norm_type` is 'layer_norm' (300M) or 'rms_norm' (6B)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    qkv_bias: bool
    qk_normalization: bool
    norm_type: str
    layer_norm_eps: float = 1e-6
    image_size: int = IMAGE_SIZE
    patch_size: int = PATCH_SIZE
    num_channels: int = 3

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class TextShape:
    """Qwen3 decoder; with `num_experts` > 0 Qwen3-MoE, whose layers are sparse except those in
    `mlp_only_layers` or off the `decoder_sparse_step` grid (dense: `intermediate_size`)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    head_dim: int = 128
    vocab_size: int = VOCAB_SIZE
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    def is_sparse_layer(self, layer: int) -> bool:
        return (self.num_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)


@dataclass(frozen=True)
class Preset:
    """One model size. `noisy` adds seeded noise to norms/layer scale so mis-mapped ones show."""

    name: str
    vision: VisionShape
    text: TextShape | GptOssShape
    downsample_ratio: float = 0.5
    noisy: bool = False
    published: tuple[float, float, float] | None = field(default=None, compare=False)

    @property
    def projector_in(self) -> int:
        """Width after pixel shuffle: C / ratio²."""
        return self.vision.hidden_size * round(1 / self.downsample_ratio) ** 2

    @property
    def image_tokens_per_tile(self) -> int:
        return round(self.vision.num_patches * self.downsample_ratio**2)

    def param_counts(self) -> dict[str, int]:
        """Parameter counts by part ('vision', 'projector', 'language', 'total'), from shapes."""
        return {
            'vision': _vision_params(self.vision),
            'projector': _projector_params(self.projector_in, self.text.hidden_size),
            'language': _text_params(self.text),
            'total': _vision_params(self.vision)
            + _projector_params(self.projector_in, self.text.hidden_size)
            + _text_params(self.text),
        }


def _vision_params(v: VisionShape) -> int:
    c, f = v.hidden_size, v.intermediate_size
    norm = 2 * c if v.norm_type == 'layer_norm' else c
    attn = 3 * c * c + (3 * c if v.qkv_bias else 0) + c * c + c
    qk_norm = 2 * c if v.qk_normalization else 0
    mlp = 2 * c * f + f + c
    layer = attn + qk_norm + mlp + 2 * norm + 2 * c  # + ls1, ls2
    embed = c + (v.num_patches + 1) * c + c * v.num_channels * v.patch_size**2 + c
    return embed + v.num_hidden_layers * layer


def _projector_params(d_in: int, h: int) -> int:
    return 2 * d_in + d_in * h + h + h * h + h


def _text_params(t: TextShape | GptOssShape) -> int:
    if isinstance(t, GptOssShape):
        return text_params(t)
    h, d = t.hidden_size, t.head_dim
    attn = h * t.num_attention_heads * d * 2 + h * t.num_key_value_heads * d * 2 + 2 * d
    layers = (attn + 2 * h) * t.num_hidden_layers
    for i in range(t.num_hidden_layers):
        if t.is_sparse_layer(i):  # router + experts
            layers += t.num_experts * (h + 3 * h * t.moe_intermediate_size)
        else:
            layers += 3 * h * t.intermediate_size
    heads = 1 if t.tie_word_embeddings else 2
    return heads * t.vocab_size * h + layers + h


# InternViT-300M-448px-V2.5 (1B..14B) and InternViT-6B-448px-V2.5 (38B).
VIT_300M = VisionShape(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                       intermediate_size=4096, qkv_bias=True, qk_normalization=False,
                       norm_type='layer_norm')
VIT_6B = VisionShape(hidden_size=3200, num_hidden_layers=45, num_attention_heads=25,
                     intermediate_size=12800, qkv_bias=False, qk_normalization=True,
                     norm_type='rms_norm')


def _qwen3(hidden: int, layers: int, heads: int, inter: int) -> TextShape:
    return TextShape(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     num_key_value_heads=8, intermediate_size=inter)


def _qwen3_moe(hidden: int, layers: int, heads: int, inter: int, moe_inter: int) -> TextShape:
    """Qwen3-MoE: 4 KV heads, 128 experts, top-8 renormalised, every layer sparse."""
    return TextShape(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     num_key_value_heads=4, intermediate_size=inter, num_experts=128,
                     num_experts_per_tok=8, moe_intermediate_size=moe_inter)


_TINY_VISION = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=128)
_TINY_TEXT = TextShape(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=128, head_dim=16)

PRESETS: dict[str, Preset] = {
    '1b': Preset('1b', VIT_300M, _qwen3(1024, 28, 16, 3072), published=(0.3, 0.8, 1.1)),
    '2b': Preset('2b', VIT_300M, _qwen3(2048, 28, 16, 6144), published=(0.3, 2.0, 2.3)),
    '4b': Preset('4b', VIT_300M, _qwen3(2560, 36, 32, 9728), published=(0.3, 4.4, 4.7)),
    '8b': Preset('8b', VIT_300M, _qwen3(4096, 36, 32, 12288), published=(0.3, 8.2, 8.5)),
    '14b': Preset('14b', VIT_300M, _qwen3(5120, 40, 40, 17408), published=(0.3, 14.8, 15.1)),
    '38b': Preset('38b', VIT_6B, _qwen3(5120, 64, 64, 25600), published=(5.5, 32.8, 38.4)),
    # Qwen3-30B-A3B and Qwen3-235B-A22B (their config.json) with the towers InternVL3.5 pairs
    # them with; 241b-a28b is meant for load_format='dummy' (about 480 GB in bf16).
    '30b-a3b': Preset('30b-a3b', VIT_300M, _qwen3_moe(2048, 48, 32, 6144, 768),
                      published=(0.3, 30.5, 30.8)),
    '241b-a28b': Preset('241b-a28b', VIT_6B, _qwen3_moe(4096, 94, 64, 12288, 1536),
                        published=(5.5, 235.1, 240.7)),
    'tiny': Preset('tiny', dataclasses.replace(VIT_300M, **_TINY_VISION), _TINY_TEXT, noisy=True),
    # 8 experts top-2 over an expert width no power of two, layer 1 dense (mlp_only_layers).
    'tiny-moe': Preset('tiny-moe', dataclasses.replace(VIT_300M, **_TINY_VISION),
                       dataclasses.replace(_TINY_TEXT, num_hidden_layers=3, num_experts=8,
                                           num_experts_per_tok=2, moe_intermediate_size=48,
                                           mlp_only_layers=(1,)),
                       noisy=True),
    # InternVL3.5-GPT-OSS-20B-A4B-Preview: InternViT-300M + gpt-oss-20b (testing/gpt_oss.py).
    'gpt-oss-20b': Preset('gpt-oss-20b', VIT_300M, GptOssShape(
        hidden_size=2880, num_hidden_layers=24, num_attention_heads=64, num_key_value_heads=8,
        intermediate_size=2880, num_local_experts=32, num_experts_per_tok=4)),
    # 4 layers (sliding, full, sliding, full) with a window of 8, 8 experts top-3 of width 24,
    # 6 heads over 2 kv heads
    'tiny-gpt-oss': Preset('tiny-gpt-oss', dataclasses.replace(VIT_300M, **_TINY_VISION),
                           GptOssShape(hidden_size=64, num_hidden_layers=4, num_attention_heads=6,
                                       num_key_value_heads=2, intermediate_size=24, head_dim=16,
                                       num_local_experts=8, num_experts_per_tok=3,
                                       sliding_window=8), noisy=True),
    'tiny-6b': Preset('tiny-6b', dataclasses.replace(VIT_6B, **_TINY_VISION), _TINY_TEXT,
                      noisy=True),
}


def get_preset(
    preset: str | Preset,
    *,
    vision_overrides: dict[str, Any] | None = None,
    text_overrides: dict[str, Any] | None = None,
) -> Preset:
    """The named preset (or `preset` itself) with the given shape fields replaced."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise KeyError(f'unknown preset {preset!r}; known: {sorted(PRESETS)}')
        preset = PRESETS[preset]
    vision = dataclasses.replace(preset.vision, **(vision_overrides or {}))
    text = dataclasses.replace(preset.text, **(text_overrides or {}))
    changed = vision != preset.vision or text != preset.text
    # Published sizes describe the unmodified shapes only.
    return dataclasses.replace(preset, vision=vision, text=text,
                               published=None if changed else preset.published)
