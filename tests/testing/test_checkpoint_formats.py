"""The three checkpoint layouts: loadable by transformers, same values in each, streamed writes."""

from __future__ import annotations

import dataclasses
import json
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from vlmdeploy.testing import checkpoint as ck
from vlmdeploy.testing import weights
from vlmdeploy.testing.presets import get_preset


def read_all(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (single file or shards)."""
    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob('model*.safetensors')):
        with safe_open(str(file), 'pt') as f:
            for key in f.keys():
                assert key not in out, f'{key} stored twice'
                out[key] = f.get_tensor(key)
    return out


# Written here independently of the generator: legacy -HF prefixes -> current -HF names.
LEGACY_TO_HF = [('language_model.model.', 'model.language_model.'),
                ('language_model.lm_head.', 'lm_head.'),
                ('vision_tower.', 'model.vision_tower.'),
                ('multi_modal_projector.', 'model.multi_modal_projector.')]


def legacy_to_hf(name: str) -> str:
    for old, new in LEGACY_TO_HF:
        if name.startswith(old):
            return new + name[len(old):]
    raise AssertionError(f'unexpected legacy name {name}')


def original_to_hf(cfg: dict, hf_names: set[str]) -> dict[str, list[str]]:
    """Original name -> the -HF tensors it holds (three for fused qkv), from config values."""
    v = cfg['vision_config']
    m: dict[str, list[str]] = {
        'vision_model.embeddings.class_embedding': ['model.vision_tower.embeddings.cls_token'],
        'vision_model.embeddings.position_embedding':
            ['model.vision_tower.embeddings.position_embeddings'],
    }
    for p in ('weight', 'bias'):
        m[f'vision_model.embeddings.patch_embedding.{p}'] = [
            f'model.vision_tower.embeddings.patch_embeddings.projection.{p}']
    for i in range(v['num_hidden_layers']):
        o, h = f'vision_model.encoder.layers.{i}.', f'model.vision_tower.encoder.layer.{i}.'
        m[o + 'ls1'], m[o + 'ls2'] = [h + 'lambda_1'], [h + 'lambda_2']
        m[o + 'attn.qkv.weight'] = [f'{h}attention.{x}_proj.weight' for x in 'qkv']
        if v['qkv_bias']:
            m[o + 'attn.qkv.bias'] = [f'{h}attention.{x}_proj.bias' for x in 'qkv']
        if v['qk_normalization']:
            m[o + 'attn.q_norm.weight'] = [h + 'attention.q_norm.weight']
            m[o + 'attn.k_norm.weight'] = [h + 'attention.k_norm.weight']
        for p in ('weight', 'bias'):
            m[f'{o}attn.proj.{p}'] = [f'{h}attention.projection_layer.{p}']
            m[f'{o}mlp.fc1.{p}'] = [f'{h}mlp.fc1.{p}']
            m[f'{o}mlp.fc2.{p}'] = [f'{h}mlp.fc2.{p}']
        norm_params = ('weight', 'bias') if v['norm_type'] == 'layer_norm' else ('weight',)
        for p in norm_params:
            m[f'{o}norm1.{p}'] = [f'{h}layernorm_before.{p}']
            m[f'{o}norm2.{p}'] = [f'{h}layernorm_after.{p}']
    for idx, part in (('0', 'layer_norm'), ('1', 'linear_1'), ('3', 'linear_2')):
        for p in ('weight', 'bias'):
            m[f'mlp1.{idx}.{p}'] = [f'model.multi_modal_projector.{part}.{p}']
    for name in hf_names:
        if name.startswith('model.language_model.'):
            m['language_model.model.' + name.removeprefix('model.language_model.')] = [name]
    m['language_model.lm_head.weight'] = ['lm_head.weight']
    return m


@pytest.mark.parametrize('preset', ['tiny', 'tiny-6b'])
@pytest.mark.parametrize('fmt', ['hf', 'hf-legacy'])
def test_hf_formats_load_in_transformers(tiny_checkpoint, preset, fmt):
    from transformers import InternVLForConditionalGeneration

    path = tiny_checkpoint(preset, fmt)
    model, info = InternVLForConditionalGeneration.from_pretrained(
        path, output_loading_info=True, dtype=torch.float32)
    assert not info['missing_keys'] and not info['unexpected_keys']
    assert not info.get('mismatched_keys')
    files = read_all(path)
    if fmt == 'hf-legacy':
        files = {legacy_to_hf(k): t for k, t in files.items()}
    state = model.state_dict()
    assert set(state) == set(files)
    for name, t in files.items():
        assert torch.equal(state[name], t), name
    # lm_head is its own tensor (InternVL3.5 never ties it).
    assert not torch.equal(model.lm_head.weight, model.model.language_model.embed_tokens.weight)


@pytest.mark.parametrize('preset', ['tiny', 'tiny-6b'])
def test_original_holds_the_hf_values(tiny_checkpoint, preset):
    original, hf = tiny_checkpoint(preset, 'original'), tiny_checkpoint(preset, 'hf')
    cfg = json.loads((original / 'config.json').read_text())
    o_tensors, h_tensors = read_all(original), read_all(hf)
    mapping = original_to_hf(cfg, set(h_tensors))
    assert set(o_tensors) == set(mapping)
    used = [h for parts in mapping.values() for h in parts]
    assert sorted(used) == sorted(h_tensors)  # every -HF tensor lands exactly once
    for name, parts in mapping.items():
        assert torch.equal(o_tensors[name], torch.cat([h_tensors[p] for p in parts])), name


def test_legacy_and_hf_hold_the_same_values(tiny_checkpoint):
    hf = read_all(tiny_checkpoint('tiny', 'hf'))
    legacy = read_all(tiny_checkpoint('tiny', 'hf-legacy'))
    assert {legacy_to_hf(k): v for k, v in legacy.items()}.keys() == hf.keys()
    for k, v in legacy.items():
        assert torch.equal(hf[legacy_to_hf(k)], v)


def test_seed_decides_the_values(tiny_checkpoint, tmp_path):
    a = read_all(tiny_checkpoint('tiny', 'hf', seed=0))
    again = read_all(ck.make_checkpoint(tmp_path / 'again', 'tiny', 'hf', seed=0))
    other = read_all(tiny_checkpoint('tiny', 'hf', seed=1))
    assert all(torch.equal(a[k], again[k]) for k in a)
    matrices = [k for k in a if a[k].ndim == 2]
    assert all(not torch.equal(a[k], other[k]) for k in matrices)


def test_value_distributions(tiny_checkpoint):
    t = read_all(tiny_checkpoint('tiny', 'hf'))
    embed = t['model.language_model.embed_tokens.weight']
    assert abs(embed.std().item() - 0.02) < 1e-3 and abs(embed.mean().item()) < 1e-3
    # Tiny presets perturb norms and layer scale so a swapped norm changes outputs.
    n0 = t['model.vision_tower.encoder.layer.0.layernorm_before.weight']
    n1 = t['model.vision_tower.encoder.layer.1.layernorm_before.weight']
    assert not torch.equal(n0, n1)
    assert ((n0 - 1).abs() <= 0.1).all() and (n0 - 1).abs().max() > 0.05
    ls = t['model.vision_tower.encoder.layer.0.lambda_1']
    assert ((ls - 0.1).abs() <= 0.05).all() and ls.std() > 0
    q_norm = t['model.language_model.layers.0.self_attn.q_norm.weight']
    assert not torch.equal(q_norm, t['model.language_model.layers.0.self_attn.k_norm.weight'])


def test_plain_presets_have_unit_norms_and_zero_norm_biases():
    plain = dataclasses.replace(get_preset('tiny'), noisy=False)
    specs = {s.name: s for s in weights.canonical_specs(plain)}
    make = weights.make_tensor
    norm = make(specs['model.vision_tower.encoder.layer.0.layernorm_before.weight'],
                noisy=plain.noisy)
    bias = make(specs['model.multi_modal_projector.layer_norm.bias'], noisy=plain.noisy)
    scale = make(specs['model.vision_tower.encoder.layer.0.lambda_2'], noisy=plain.noisy)
    assert torch.equal(norm, torch.ones_like(norm)) and torch.equal(bias, torch.zeros_like(bias))
    assert torch.equal(scale, torch.full_like(scale, 0.1))


def test_bfloat16_is_the_float32_model_rounded(tiny_checkpoint):
    f32 = read_all(tiny_checkpoint('tiny', 'original'))
    bf16_dir = tiny_checkpoint('tiny', 'original', dtype=torch.bfloat16)
    bf16 = read_all(bf16_dir)
    assert all(t.dtype == torch.bfloat16 for t in bf16.values())
    assert all(torch.equal(f32[k].to(torch.bfloat16), bf16[k]) for k in f32)
    cfg = json.loads((bf16_dir / 'config.json').read_text())
    assert cfg['torch_dtype'] == 'bfloat16' and cfg['llm_config']['torch_dtype'] == 'bfloat16'


def test_shards_and_index(tiny_checkpoint, tmp_path):
    limit = 30_000_000  # the two (151936, 64) fp32 matrices are ~39 MB each
    out = ck.make_checkpoint(tmp_path / 'sharded', 'tiny', 'hf', max_shard_bytes=limit)
    files = sorted(out.glob('model-*.safetensors'))
    assert len(files) > 1 and not (out / 'model.safetensors').exists()
    index = json.loads((out / 'model.safetensors.index.json').read_text())
    tensors = read_all(out)
    assert set(index['weight_map']) == set(tensors)
    assert set(index['weight_map'].values()) == {f.name for f in files}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    assert index['metadata']['total_size'] == total
    for f in files:
        with safe_open(str(f), 'pt') as sf:
            sizes = [sf.get_slice(k).get_shape() for k in sf.keys()]
        data = sum(torch.Size(s).numel() * 4 for s in sizes)
        assert data <= limit or len(sizes) == 1
    whole = read_all(tiny_checkpoint('tiny', 'hf'))
    assert all(torch.equal(whole[k], tensors[k]) for k in whole)
    # Re-writing as one file removes the shards and the index.
    ck.make_checkpoint(out, 'tiny', 'hf')
    assert [p.name for p in out.glob('model*')] == ['model.safetensors']


def test_sharded_hf_checkpoint_loads(tmp_path):
    from transformers import InternVLForConditionalGeneration

    out = ck.make_checkpoint(tmp_path / 'sharded', 'tiny', 'hf', max_shard_bytes=30_000_000)
    _, info = InternVLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info['missing_keys'] and not info['unexpected_keys']


def test_writer_holds_one_tensor_at_a_time(tmp_path):
    preset = get_preset('tiny', text_overrides={'vocab_size': 1000})
    tensors = weights.file_tensors(preset, 'original')
    alive: list[weakref.ref] = []
    peak = 0

    def produce(ft: weights.FileTensor) -> torch.Tensor:
        nonlocal peak  # tensors die by refcount, so a dead weakref means freed
        peak = max(peak, sum(r() is not None for r in alive))
        t = weights.make_file_tensor(ft, 0, True, torch.float32, 'cpu')
        alive.append(weakref.ref(t))
        return t

    ck.write_safetensors(tmp_path / 'm.safetensors', tensors, torch.float32, produce)
    assert peak == 0  # the previous tensor was released before the next was made
    with safe_open(str(tmp_path / 'm.safetensors'), 'pt') as f:
        assert set(f.keys()) == {ft.name for ft in tensors}


def test_no_weights_writes_configs_and_tokenizer_only(tmp_path):
    out = ck.make_checkpoint(tmp_path / 'o', '8b', 'original', weights=False)
    assert not list(out.glob('*.safetensors'))
    names = {p.name for p in out.iterdir()}
    assert {'config.json', 'generation_config.json', 'tokenizer.json',
            'tokenizer_config.json'} <= names
    gen = json.loads((out / 'generation_config.json').read_text())
    assert gen['eos_token_id'] == [151645, 151643]


def test_original_config_fields(tmp_path):
    cfg = json.loads((ck.make_checkpoint(tmp_path / 'o', '38b', weights=False)
                      / 'config.json').read_text())
    assert cfg['architectures'] == ['InternVLChatModel'] and cfg['model_type'] == 'internvl_chat'
    assert cfg['ps_version'] == 'v2' and cfg['template'] == 'internvl2_5'
    assert cfg['downsample_ratio'] == 0.5 and cfg['select_layer'] == -1
    assert cfg['force_image_size'] == 448 and cfg['max_dynamic_patch'] == 12
    assert cfg['dynamic_image_size'] and cfg['use_thumbnail']
    assert 'auto_map' not in cfg  # no remote code is shipped
    llm, vision = cfg['llm_config'], cfg['vision_config']
    assert llm['architectures'] == ['Qwen3ForCausalLM'] and llm['model_type'] == 'qwen3'
    assert llm['vocab_size'] == 151936 and llm['tie_word_embeddings'] is False
    assert (llm['hidden_size'], llm['num_hidden_layers'], llm['head_dim']) == (5120, 64, 128)
    assert llm['rope_theta'] == 1e6 and llm['rms_norm_eps'] == 1e-6
    assert vision['architectures'] == ['InternVisionModel']
    assert vision['norm_type'] == 'rms_norm' and vision['qk_normalization'] is True
    assert vision['qkv_bias'] is False and vision['hidden_size'] == 3200
    assert (vision['image_size'], vision['patch_size']) == (448, 14)


def test_hf_config_loads_with_autoconfig(tmp_path):
    from transformers import AutoConfig

    out = ck.make_checkpoint(tmp_path / 'h', '8b', 'hf', weights=False)
    cfg = AutoConfig.from_pretrained(out)
    assert cfg.model_type == 'internvl' and cfg.image_token_id == 151671
    assert cfg.text_config.model_type == 'qwen3' and cfg.text_config.hidden_size == 4096
    assert cfg.vision_config.hidden_size == 1024 and cfg.vision_config.attention_bias
    assert not cfg.tie_word_embeddings and not cfg.text_config.tie_word_embeddings


def test_shape_overrides_reach_config_and_files(tmp_path):
    out = ck.make_checkpoint(tmp_path / 'o', 'tiny', text_overrides={'num_hidden_layers': 3},
                             vision_overrides={'num_hidden_layers': 1})
    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['llm_config']['num_hidden_layers'] == 3
    assert cfg['vision_config']['num_hidden_layers'] == 1
    names = read_all(out).keys()
    assert 'language_model.model.layers.2.mlp.up_proj.weight' in names
    assert not any(n.startswith('language_model.model.layers.3.') for n in names)
    assert not any(n.startswith('vision_model.encoder.layers.1.') for n in names)


def test_cli(tmp_path, capsys):
    ck.main(['--preset', 'tiny', '--format', 'hf-legacy', '--out', str(tmp_path / 'c'),
             '--dtype', 'float32', '--text', 'num_hidden_layers=1', '--seed', '3'])
    info = json.loads(capsys.readouterr().out)
    assert info['format'] == 'hf-legacy' and info['shapes']['text']['num_hidden_layers'] == 1
    tensors = read_all(tmp_path / 'c')
    assert 'language_model.lm_head.weight' in tensors
    assert all(t.dtype == torch.float32 for t in tensors.values())
    ck.main(['--preset', '14b', '--out', str(tmp_path / 'n'), '--no-weights'])
    cfg = json.loads((tmp_path / 'n' / 'config.json').read_text())
    assert cfg['llm_config']['hidden_size'] == 5120 and cfg['llm_config']['num_hidden_layers'] == 40


def test_rejects_unknown_format_and_dtype(tmp_path):
    with pytest.raises(ValueError):
        ck.make_checkpoint(tmp_path, 'tiny', 'gguf', weights=False)
    with pytest.raises(ValueError):
        ck.make_checkpoint(tmp_path, 'tiny', 'hf', dtype=torch.int8, weights=False)


@pytest.mark.parametrize('preset', ['tiny', 'tiny-6b'])
def test_tiny_model_runs_and_sees_the_image(tiny_checkpoint, preset):
    from transformers import InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration.from_pretrained(tiny_checkpoint(preset, 'hf'))
    ids = torch.tensor([[151644, 872, 198, 151669] + [151671] * 256 + [151670, 198, 151645]])
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, 448, 448, generator=gen)  # (tiles, 3, 448, 448)
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=pixels[:1]).logits
        b = model(input_ids=ids, pixel_values=pixels[1:]).logits
    assert torch.isfinite(a).all() and a.std() > 0
    assert not torch.allclose(a[0, -1], b[0, -1])  # the image reaches the last position
