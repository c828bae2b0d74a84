"""What tensors a random-weight InternVL3.5 checkpoint holds, under which name in each layout, and
their values.

Layouts:
- 'original': the `InternVLChatModel` layout of the OpenGVLab repos (fused `attn.qkv`,
  `ls1/ls2`, `norm1/norm2`, `mlp1.{0,1,3}`, `language_model.model.*`, `language_model.lm_head`).
- 'hf': what transformers' `InternVLForConditionalGeneration` saves (`model.vision_tower.*`,
  `model.multi_modal_projector.*`, `model.language_model.*`, `lm_head`).
- 'hf-legacy': the same with the older prefixes (`vision_tower.*`, `multi_modal_projector.*`,
  `language_model.model.*`, `language_model.lm_head.*`).

Values: every tensor is a function of (seed, its -HF name, dtype, generator device type) only, so
one seed gives the same model in every layout (original `qkv` = cat(q, k, v) of the -HF
tensors). Matrices and embeddings ~ N(0, 0.02), linear biases ~ N(0, 0.02), norm weights 1,
norm biases 0, layer scale 0.1; presets marked `noisy` (the tiny ones) perturb norms, norm biases
and layer scale by seeded uniform noise so a mis-mapped norm changes outputs. CPU and CUDA draw
different (each reproducible) numbers.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

import torch

from vlmdeploy.testing.presets import Preset

FORMATS = ('original', 'hf', 'hf-legacy')


@dataclass(frozen=True)
class TensorSpec:
    """One parameter under its canonical (-HF) name. `init` picks the value distribution."""

    name: str
    shape: tuple[int, ...]
    init: str  # 'normal' | 'bias' | 'norm' | 'norm_bias' | 'layer_scale'

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class FileTensor:
    """One tensor as stored: its on-disk name and the canonical tensors concatenated on dim 0;
    with `stack` > 0 (experts stored fused) the parts form `stack` equal groups, each
    concatenated on dim 0, stacked along a new dim 0."""

    name: str
    shape: tuple[int, ...]
    parts: tuple[TensorSpec, ...]
    stack: int = 0


# ----------------------------------------------------------------------------------------------
# What tensors exist


def canonical_specs(preset: Preset) -> list[TensorSpec]:
    """Every parameter of the model, named as transformers' InternVL (-HF) names it."""
    return [*_vision_specs(preset), *_projector_specs(preset), *_text_specs(preset)]


def _vision_specs(p: Preset) -> list[TensorSpec]:
    v, c = p.vision, p.vision.hidden_size
    e = 'model.vision_tower.embeddings.'
    out = [TensorSpec(e + 'cls_token', (1, 1, c), 'normal'),
           TensorSpec(e + 'position_embeddings', (1, v.num_patches + 1, c), 'normal'),
           TensorSpec(e + 'patch_embeddings.projection.weight',
                      (c, v.num_channels, v.patch_size, v.patch_size), 'normal'),
           TensorSpec(e + 'patch_embeddings.projection.bias', (c,), 'bias')]
    for i in range(v.num_hidden_layers):
        out += _vision_layer_specs(p, f'model.vision_tower.encoder.layer.{i}.')
    return out


def _vision_layer_specs(p: Preset, prefix: str) -> list[TensorSpec]:
    v, c, f = p.vision, p.vision.hidden_size, p.vision.intermediate_size
    out = [TensorSpec(prefix + 'lambda_1', (c,), 'layer_scale'),
           TensorSpec(prefix + 'lambda_2', (c,), 'layer_scale')]
    for proj in ('q_proj', 'k_proj', 'v_proj'):
        out.append(TensorSpec(f'{prefix}attention.{proj}.weight', (c, c), 'normal'))
        if v.qkv_bias:
            out.append(TensorSpec(f'{prefix}attention.{proj}.bias', (c,), 'bias'))
    out += [TensorSpec(prefix + 'attention.projection_layer.weight', (c, c), 'normal'),
            TensorSpec(prefix + 'attention.projection_layer.bias', (c,), 'bias')]
    if v.qk_normalization:
        out += [TensorSpec(prefix + 'attention.q_norm.weight', (c,), 'norm'),
                TensorSpec(prefix + 'attention.k_norm.weight', (c,), 'norm')]
    out += [TensorSpec(prefix + 'mlp.fc1.weight', (f, c), 'normal'),
            TensorSpec(prefix + 'mlp.fc1.bias', (f,), 'bias'),
            TensorSpec(prefix + 'mlp.fc2.weight', (c, f), 'normal'),
            TensorSpec(prefix + 'mlp.fc2.bias', (c,), 'bias')]
    for norm in ('layernorm_before', 'layernorm_after'):
        out.append(TensorSpec(f'{prefix}{norm}.weight', (c,), 'norm'))
        if v.norm_type == 'layer_norm':
            out.append(TensorSpec(f'{prefix}{norm}.bias', (c,), 'norm_bias'))
    return out


def _projector_specs(p: Preset) -> list[TensorSpec]:
    d, h = p.projector_in, p.text.hidden_size
    m = 'model.multi_modal_projector.'
    return [TensorSpec(m + 'layer_norm.weight', (d,), 'norm'),
            TensorSpec(m + 'layer_norm.bias', (d,), 'norm_bias'),
            TensorSpec(m + 'linear_1.weight', (h, d), 'normal'),
            TensorSpec(m + 'linear_1.bias', (h,), 'bias'),
            TensorSpec(m + 'linear_2.weight', (h, h), 'normal'),
            TensorSpec(m + 'linear_2.bias', (h,), 'bias')]


def _text_specs(p: Preset) -> list[TensorSpec]:
    from vlmdeploy.testing.gpt_oss import GptOssShape, text_specs

    if isinstance(p.text, GptOssShape):
        return text_specs(p.text)
    t, h = p.text, p.text.hidden_size
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    lm = 'model.language_model.'
    out = [TensorSpec(lm + 'embed_tokens.weight', (t.vocab_size, h), 'normal')]
    for i in range(t.num_hidden_layers):
        a, m = f'{lm}layers.{i}.self_attn.', f'{lm}layers.{i}.mlp.'
        out += [TensorSpec(a + 'q_proj.weight', (q, h), 'normal'),
                TensorSpec(a + 'k_proj.weight', (kv, h), 'normal'),
                TensorSpec(a + 'v_proj.weight', (kv, h), 'normal'),
                TensorSpec(a + 'o_proj.weight', (h, q), 'normal'),
                TensorSpec(a + 'q_norm.weight', (t.head_dim,), 'norm'),
                TensorSpec(a + 'k_norm.weight', (t.head_dim,), 'norm'),
                *(_expert_specs(t, m) if t.is_sparse_layer(i) else _mlp_specs(t, m)),
                TensorSpec(f'{lm}layers.{i}.input_layernorm.weight', (h,), 'norm'),
                TensorSpec(f'{lm}layers.{i}.post_attention_layernorm.weight', (h,), 'norm')]
    out.append(TensorSpec(lm + 'norm.weight', (h,), 'norm'))
    if not t.tie_word_embeddings:
        out.append(TensorSpec('lm_head.weight', (t.vocab_size, h), 'normal'))
    return out


def _mlp_specs(t, m: str) -> list[TensorSpec]:
    h, f = t.hidden_size, t.intermediate_size
    return [TensorSpec(m + 'gate_proj.weight', (f, h), 'normal'),
            TensorSpec(m + 'up_proj.weight', (f, h), 'normal'),
            TensorSpec(m + 'down_proj.weight', (h, f), 'normal')]


def _expert_specs(t, m: str) -> list[TensorSpec]:
    """A sparse MLP: the router, then each expert's gate, up and down (expert-major, the order
    the fused 3-D tensors stack them in)."""
    h, f = t.hidden_size, t.moe_intermediate_size
    out = [TensorSpec(m + 'gate.weight', (t.num_experts, h), 'normal')]
    for e in range(t.num_experts):
        out += [TensorSpec(f'{m}experts.{e}.gate_proj.weight', (f, h), 'normal'),
                TensorSpec(f'{m}experts.{e}.up_proj.weight', (f, h), 'normal'),
                TensorSpec(f'{m}experts.{e}.down_proj.weight', (h, f), 'normal')]
    return out


# Per-expert tensors stored fused (as transformers 5's Qwen3-MoE holds them): gate and up of
# expert e become rows [2I·e, 2I·e + 2I) of `gate_up_proj` (E, 2I, H), down `down_proj` (E, H, I).
_FUSED_EXPERT = re.compile(r'\.mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)\.weight$')


def _fuse_experts(name: str) -> str:
    m = _FUSED_EXPERT.search(name)
    if not m:
        return name
    leaf = 'down_proj' if m.group(1) == 'down_proj' else 'gate_up_proj'
    return f'{name[:m.start()]}.mlp.experts.{leaf}'


# Ordered renames from -HF names to the other layouts (first matching prefix rule wins for the
# prefix; the in-layer rules of 'original' then apply to the rest of the name).
_LEGACY_PREFIXES = [('model.language_model.', 'language_model.model.'),
                    ('lm_head.', 'language_model.lm_head.'),
                    ('model.vision_tower.', 'vision_tower.'),
                    ('model.multi_modal_projector.', 'multi_modal_projector.')]
_ORIGINAL_RULES = [
    (r'^model\.vision_tower\.embeddings\.cls_token$', 'vision_model.embeddings.class_embedding'),
    (r'^model\.vision_tower\.embeddings\.position_embeddings$',
     'vision_model.embeddings.position_embedding'),
    (r'^model\.vision_tower\.embeddings\.patch_embeddings\.projection\.',
     'vision_model.embeddings.patch_embedding.'),
    (r'^model\.vision_tower\.encoder\.layer\.(\d+)\.', r'vision_model.encoder.layers.\1.'),
    (r'\.lambda_(\d)$', r'.ls\1'),
    (r'\.attention\.projection_layer\.', '.attn.proj.'),
    (r'\.attention\.([qkv])_proj\.', r'.attn.qkv.'),  # fused below
    (r'\.attention\.', '.attn.'),
    (r'\.layernorm_before\.', '.norm1.'),
    (r'\.layernorm_after\.', '.norm2.'),
    (r'^model\.multi_modal_projector\.layer_norm\.', 'mlp1.0.'),
    (r'^model\.multi_modal_projector\.linear_1\.', 'mlp1.1.'),
    (r'^model\.multi_modal_projector\.linear_2\.', 'mlp1.3.'),
    (r'^model\.language_model\.', 'language_model.model.'),
    (r'^lm_head\.', 'language_model.lm_head.'),
]


def stored_name(name: str, fmt: str, fused_experts: bool = False) -> str:
    """The on-disk name of canonical tensor `name` in format `fmt` (q/k/v map to `qkv`); with
    `fused_experts` each expert's tensors map to the 3-D `gate_up_proj` / `down_proj`."""
    if fused_experts:
        name = _fuse_experts(name)
    if fmt == 'hf':
        return name
    if fmt == 'hf-legacy':
        for old, new in _LEGACY_PREFIXES:
            if name.startswith(old):
                return new + name[len(old):]
        return name
    if fmt == 'original':
        for pattern, repl in _ORIGINAL_RULES:
            name = re.sub(pattern, repl, name)
        return name
    raise ValueError(f'unknown format {fmt!r}; expected one of {FORMATS}')


def file_tensors(preset: Preset, fmt: str, fused_experts: bool = False) -> list[FileTensor]:
    """The tensors a checkpoint of `fmt` holds, in write order; fused ones list their parts.
    `fused_experts`: experts as 3-D tensors (else one tensor per expert and projection)."""
    grouped: dict[str, list[TensorSpec]] = {}
    for spec in canonical_specs(preset):
        grouped.setdefault(stored_name(spec.name, fmt, fused_experts), []).append(spec)
    out = []
    for name, parts in grouped.items():
        # per-expert parts stored as one 3-D tensor (GPT-OSS's canonical tensors are 3-D already)
        fused = name.endswith(('.gate_up_proj', '.down_proj')) and bool(
            _FUSED_EXPERT.search(parts[0].name))
        stack = preset.text.num_experts if fused else 0
        groups = len(parts) // stack if stack else len(parts)
        rows = sum(s.shape[0] for s in parts[:groups])  # q, k, v stack along the output dim
        shape = (rows, *parts[0].shape[1:])
        out.append(FileTensor(name, (stack, *shape) if stack else shape, tuple(parts), stack))
    return out


# ----------------------------------------------------------------------------------------------
# Values


def _stable_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed from (seed, name); Python's hash() is salted per process."""
    digest = hashlib.sha256(f'{seed}/{name}'.encode()).digest()
    return int.from_bytes(digest[:8], 'little') & (2**63 - 1)


def make_tensor(spec: TensorSpec, seed: int = 0, *, noisy: bool = False,
                dtype: torch.dtype = torch.float32, device: str | torch.device = 'cpu'
                ) -> torch.Tensor:
    """The value of one canonical tensor: a function of (seed, spec.name, dtype, device type)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(_stable_seed(seed, spec.name))

    def uniform(half_width: float) -> torch.Tensor:  # U(-w, w)
        u = torch.rand(spec.shape, generator=gen, device=device, dtype=torch.float32)
        return u.mul_(2 * half_width).sub_(half_width)

    if spec.init in ('normal', 'bias'):
        t = torch.randn(spec.shape, generator=gen, device=device, dtype=torch.float32)
        t.mul_(0.02)
    elif spec.init == 'norm':
        t = uniform(0.1).add_(1.0) if noisy else torch.ones(spec.shape, device=device)
    elif spec.init == 'norm_bias':
        t = uniform(0.1) if noisy else torch.zeros(spec.shape, device=device)
    elif spec.init == 'layer_scale':
        t = uniform(0.05).add_(0.1) if noisy else torch.full(spec.shape, 0.1, device=device)
    else:
        raise ValueError(f'unknown init {spec.init!r} for {spec.name}')
    return t.to(dtype)


def make_file_tensor(ft: FileTensor, seed: int, noisy: bool, dtype: torch.dtype,
                      device: str) -> torch.Tensor:
    parts = [make_tensor(s, seed, noisy=noisy, dtype=dtype, device=device) for s in ft.parts]
    if ft.stack:  # experts: (E, 2I, H) from each expert's (gate; up), (E, H, I) from its down
        per = len(parts) // ft.stack
        groups = [torch.cat(parts[i:i + per], dim=0) for i in range(0, len(parts), per)]
        return torch.stack(groups).to('cpu').contiguous()
    t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)  # (3C, C) for fused qkv
    return t.to('cpu').contiguous()
