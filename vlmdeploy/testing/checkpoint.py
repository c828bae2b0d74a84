"""Random-weight InternVL3.5 checkpoints of any preset size, in all three on-disk formats.

    make_checkpoint(out_dir, preset='tiny', fmt='original' | 'hf' | 'hf-legacy', seed=0,
                    dtype=torch.float32, device='cpu', weights=True, max_shard_bytes=4e9)

Formats:
- 'original': the `InternVLChatModel` layout of the OpenGVLab repos (config `internvl_chat` with
  `llm_config` / `vision_config`; fused `attn.qkv`, `ls1/ls2`, `norm1/norm2`, `mlp1.{0,1,3}`,
  `language_model.model.*`, `language_model.lm_head`). No remote code is written.
- 'hf': what transformers' `InternVLForConditionalGeneration` saves (`model.vision_tower.*`,
  `model.multi_modal_projector.*`, `model.language_model.*`, `lm_head`), plus processor files.
- 'hf-legacy': the same with the older prefixes (`vision_tower.*`, `multi_modal_projector.*`,
  `language_model.model.*`, `language_model.lm_head.*`).

Values: every tensor is a function of (seed, its -HF name, dtype, generator device type) only, so
one seed gives the same model in every format (original `qkv` = cat(q, k, v) of the -HF
tensors). Matrices and embeddings ~ N(0, 0.02), linear biases ~ N(0, 0.02), norm weights 1,
norm biases 0, layer scale 0.1; presets marked `noisy` (the tiny ones) perturb norms, norm biases
and layer scale by seeded uniform noise so a mis-mapped norm changes outputs. CPU and CUDA draw
different (each reproducible) numbers.

Writing streams: shard boundaries and safetensors headers are planned from shapes, then each
tensor is generated, written and dropped, so memory holds one tensor at a time. One file
`model.safetensors` when everything fits in `max_shard_bytes`, else numbered shards plus
`model.safetensors.index.json`. `weights=False` writes config and tokenizer files only.

CLI: python -m vlmdeploy.testing.checkpoint --preset 8b --format hf --out DIR [--seed 0]
     [--dtype bfloat16] [--device cuda] [--no-weights] [--text KEY=VALUE] [--vision KEY=VALUE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from vlmdeploy.testing.presets import PRESETS, Preset, get_preset
from vlmdeploy.testing.tokenizer import write_tokenizer

FORMATS = ('original', 'hf', 'hf-legacy')
BOS_ID, EOS_ID, IMG_CONTEXT_ID = 151643, 151645, 151671
DEFAULT_SHARD_BYTES = 4 * 10**9
_SAFETENSORS_DTYPES = {torch.float32: 'F32', torch.bfloat16: 'BF16', torch.float16: 'F16'}


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
    """One tensor as stored: its on-disk name and the canonical tensors concatenated on dim 0."""

    name: str
    shape: tuple[int, ...]
    parts: tuple[TensorSpec, ...]


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
                TensorSpec(m + 'gate_proj.weight', (t.intermediate_size, h), 'normal'),
                TensorSpec(m + 'up_proj.weight', (t.intermediate_size, h), 'normal'),
                TensorSpec(m + 'down_proj.weight', (h, t.intermediate_size), 'normal'),
                TensorSpec(f'{lm}layers.{i}.input_layernorm.weight', (h,), 'norm'),
                TensorSpec(f'{lm}layers.{i}.post_attention_layernorm.weight', (h,), 'norm')]
    out.append(TensorSpec(lm + 'norm.weight', (h,), 'norm'))
    if not t.tie_word_embeddings:
        out.append(TensorSpec('lm_head.weight', (t.vocab_size, h), 'normal'))
    return out


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


def stored_name(name: str, fmt: str) -> str:
    """The on-disk name of canonical tensor `name` in format `fmt` (q/k/v map to `qkv`)."""
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


def file_tensors(preset: Preset, fmt: str) -> list[FileTensor]:
    """The tensors a checkpoint of `fmt` holds, in write order; fused ones list their parts."""
    grouped: dict[str, list[TensorSpec]] = {}
    for spec in canonical_specs(preset):
        grouped.setdefault(stored_name(spec.name, fmt), []).append(spec)
    out = []
    for name, parts in grouped.items():
        rows = sum(s.shape[0] for s in parts)  # q, k, v stack along the output dim
        out.append(FileTensor(name, (rows, *parts[0].shape[1:]), tuple(parts)))
    return out


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
    ours = {s.name: s.shape for s in canonical_specs(preset)}
    if theirs != ours:
        diff = sorted(set(theirs.items()) ^ set(ours.items()))[:10]
        raise RuntimeError(f'parameter layout differs from transformers: {diff}')


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


def _make_file_tensor(ft: FileTensor, seed: int, noisy: bool, dtype: torch.dtype,
                      device: str) -> torch.Tensor:
    parts = [make_tensor(s, seed, noisy=noisy, dtype=dtype, device=device) for s in ft.parts]
    t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)  # (3C, C) for fused qkv
    return t.to('cpu').contiguous()


# ----------------------------------------------------------------------------------------------
# Configs


def text_config(preset: Preset, dtype: torch.dtype) -> dict[str, Any]:
    """The Qwen3 block shared by `llm_config` (original) and `text_config` (-HF)."""
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


def _processor_files(preset: Preset) -> dict[str, dict[str, Any]]:
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


def _generation_config() -> dict[str, Any]:
    # Qwen3's stop set: <|im_end|> then <|endoftext|>. No sampling defaults: benchmarks and
    # tests choose their own.
    return {'bos_token_id': BOS_ID, 'eos_token_id': [EOS_ID, BOS_ID], 'pad_token_id': BOS_ID}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix('torch.')


# ----------------------------------------------------------------------------------------------
# Writing


def plan_shards(tensors: Sequence[FileTensor], itemsize: int,
                max_shard_bytes: int) -> list[list[FileTensor]]:
    """Greedy split in order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[FileTensor]] = [[]]
    size = 0
    for ft in tensors:
        nbytes = math.prod(ft.shape) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(ft)
        size += nbytes
    return shards


def write_safetensors(path: Path, tensors: Sequence[FileTensor], dtype: torch.dtype,
                      produce: Callable[[FileTensor], torch.Tensor],
                      metadata: dict[str, str] | None = None) -> int:
    """Write one safetensors file, generating each tensor just before its bytes are written.

    The header (names, dtypes, shapes, byte offsets) is known from the shapes alone, so no more
    than one tensor is ever held. Returns the number of data bytes written.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict[str, Any] = {'__metadata__': {'format': 'pt', **(metadata or {})}}
    offset = 0
    for ft in tensors:
        nbytes = math.prod(ft.shape) * itemsize
        header[ft.name] = {'dtype': _SAFETENSORS_DTYPES[dtype], 'shape': list(ft.shape),
                           'data_offsets': [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(',', ':')).encode()
    blob += b' ' * (-len(blob) % 8)  # data starts 8-byte aligned
    with open(path, 'wb') as f:
        f.write(struct.pack('<Q', len(blob)))
        f.write(blob)
        for ft in tensors:
            t = produce(ft)
            if tuple(t.shape) != ft.shape or t.dtype != dtype:
                raise RuntimeError(f'{ft.name}: made {t.dtype}{tuple(t.shape)}, planned {ft.shape}')
            f.write(memoryview(t.view(torch.uint8).reshape(-1).numpy()))  # little-endian
            del t  # drop it before the next one is made: peak memory is one tensor
    return offset


def _write_weights(out: Path, preset: Preset, fmt: str, seed: int, dtype: torch.dtype,
                   device: str, max_shard_bytes: int) -> dict[str, Any]:
    for stale in [*out.glob('model*.safetensors'), out / 'model.safetensors.index.json']:
        stale.unlink(missing_ok=True)  # a stale shard of another split would confuse loaders
    tensors = file_tensors(preset, fmt)
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = plan_shards(tensors, itemsize, max_shard_bytes)
    meta = {'generator': 'vlmdeploy.testing', 'preset': preset.name, 'seed': str(seed),
            'format': fmt}

    def produce(ft: FileTensor) -> torch.Tensor:
        return _make_file_tensor(ft, seed, preset.noisy, dtype, device)

    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards):
        fname = ('model.safetensors' if len(shards) == 1
                 else f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors')
        total += write_safetensors(out / fname, shard, dtype, produce, meta)
        weight_map.update({ft.name: fname for ft in shard})
    if len(shards) > 1:
        index = {'metadata': {'total_size': total}, 'weight_map': weight_map}
        _write_json(out / 'model.safetensors.index.json', index)
    return {'weight_bytes': total, 'tensors': len(tensors), 'shards': len(shards)}


def make_checkpoint(
    out_dir: str | Path,
    preset: str | Preset = 'tiny',
    fmt: str = 'original',
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str = 'cpu',
    weights: bool = True,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    *,
    vision_overrides: dict[str, Any] | None = None,
    text_overrides: dict[str, Any] | None = None,
) -> Path:
    """Write a random-weight checkpoint directory and return its path (see module docstring)."""
    if fmt not in FORMATS:
        raise ValueError(f'unknown format {fmt!r}; expected one of {FORMATS}')
    if dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f'unsupported dtype {dtype}; use one of {list(_SAFETENSORS_DTYPES)}')
    p = get_preset(preset, vision_overrides=vision_overrides, text_overrides=text_overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == 'original':
        _write_json(out / 'config.json', original_config(p, dtype))
    else:
        check_against_transformers(p)
        _write_json(out / 'config.json', hf_config(p, dtype))
        for fname, obj in _processor_files(p).items():
            _write_json(out / fname, obj)
    _write_json(out / 'generation_config.json', _generation_config())
    write_tokenizer(out, 'original' if fmt == 'original' else 'hf')
    if weights:
        _write_weights(out, p, fmt, seed, dtype, device, int(max_shard_bytes))
    return out


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + '\n', encoding='utf-8')


# ----------------------------------------------------------------------------------------------
# CLI


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    """KEY=VALUE pairs; VALUE is JSON when it parses (3, true, 1e-5), else a string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition('=')
        if not sep:
            raise argparse.ArgumentTypeError(f'expected KEY=VALUE, got {item!r}')
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog='python -m vlmdeploy.testing.checkpoint',
                                 description='Write a random-weight InternVL3.5 checkpoint.')
    ap.add_argument('--preset', default='tiny', choices=sorted(PRESETS))
    ap.add_argument('--format', dest='fmt', default='original', choices=FORMATS)
    ap.add_argument('--out', required=True, help='output directory')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float16', 'float32'])
    ap.add_argument('--device', default='cpu', help="where to generate: 'cpu' or 'cuda'")
    ap.add_argument('--no-weights', action='store_true', help='config and tokenizer only')
    ap.add_argument('--max-shard-gb', type=float, default=DEFAULT_SHARD_BYTES / 1e9)
    ap.add_argument('--text', action='append', default=[], metavar='KEY=VALUE',
                    help='override a language-model shape field (repeatable)')
    ap.add_argument('--vision', action='append', default=[], metavar='KEY=VALUE',
                    help='override a vision-tower shape field (repeatable)')
    args = ap.parse_args(argv)
    start = time.perf_counter()
    preset = get_preset(args.preset, vision_overrides=_parse_overrides(args.vision),
                        text_overrides=_parse_overrides(args.text))
    out = make_checkpoint(args.out, preset, args.fmt, seed=args.seed,
                          dtype=getattr(torch, args.dtype), device=args.device,
                          weights=not args.no_weights,
                          max_shard_bytes=int(args.max_shard_gb * 1e9))
    info = {'out': str(out), 'preset': preset.name, 'format': args.fmt, 'seed': args.seed,
            'dtype': args.dtype, 'params': preset.param_counts()['total'],
            'shapes': {'vision': asdict(preset.vision), 'text': asdict(preset.text)},
            'seconds': round(time.perf_counter() - start, 1)}
    print(json.dumps(info))


if __name__ == '__main__':
    main()
