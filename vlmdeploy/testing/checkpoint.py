"""Random-weight InternVL3.5 checkpoints of any preset size, in all three on-disk layouts.

    make_checkpoint(out_dir, preset='tiny', fmt='original' | 'hf' | 'hf-legacy', seed=0,
                    dtype=torch.float32, device='cpu', weights=True, max_shard_bytes=4e9,
                    fused_experts=False)

What tensors each layout holds and their values: :mod:`vlmdeploy.testing.weights`; the config
files: :mod:`vlmdeploy.testing.configs`. This module writes them.

Writing streams: shard boundaries and safetensors headers are planned from shapes, then each
tensor is generated, written and dropped, so memory holds one tensor at a time. One file
`model.safetensors` when everything fits in `max_shard_bytes`, else numbered shards plus
`model.safetensors.index.json`. `weights=False` writes config and tokenizer files only.

CLI: python -m vlmdeploy.testing.checkpoint --preset 8b --format hf --out DIR [--seed 0]
     [--dtype bfloat16] [--device cuda] [--no-weights] [--text KEY=VALUE] [--vision KEY=VALUE]
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from vlmdeploy.testing.configs import (
    check_against_transformers,
    generation_config,
    hf_config,
    original_config,
    processor_files,
)
from vlmdeploy.testing.presets import PRESETS, Preset, get_preset
from vlmdeploy.testing.tokenizer import write_tokenizer
from vlmdeploy.testing.weights import FORMATS, FileTensor, file_tensors, make_file_tensor

DEFAULT_SHARD_BYTES = 4 * 10**9
_SAFETENSORS_DTYPES = {torch.float32: 'F32', torch.bfloat16: 'BF16', torch.float16: 'F16'}


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
                   device: str, max_shard_bytes: int, fused_experts: bool) -> dict[str, Any]:
    for stale in [*out.glob('model*.safetensors'), out / 'model.safetensors.index.json']:
        stale.unlink(missing_ok=True)  # a stale shard of another split would confuse loaders
    tensors = file_tensors(preset, fmt, fused_experts)
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = plan_shards(tensors, itemsize, max_shard_bytes)
    meta = {'generator': 'vlmdeploy.testing', 'preset': preset.name, 'seed': str(seed),
            'format': fmt, **({'experts': 'fused'} if fused_experts else {})}

    def produce(ft: FileTensor) -> torch.Tensor:
        return make_file_tensor(ft, seed, preset.noisy, dtype, device)

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
    fused_experts: bool = False,
) -> Path:
    """Write a random-weight checkpoint directory and return its path (see module docstring).
    A mixture-of-experts model stores its experts one tensor per expert and projection (as the
    published checkpoints do), or with ``fused_experts`` as 3-D tensors (as transformers 5 holds
    them)."""
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
        for fname, obj in processor_files(p).items():
            _write_json(out / fname, obj)
    _write_json(out / 'generation_config.json', generation_config())
    write_tokenizer(out, 'original' if fmt == 'original' else 'hf')
    if weights:
        _write_weights(out, p, fmt, seed, dtype, device, int(max_shard_bytes), fused_experts)
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
    ap.add_argument('--fused-experts', action='store_true',
                    help='MoE experts as 3-D tensors (default: one tensor per expert)')
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
                          max_shard_bytes=int(args.max_shard_gb * 1e9),
                          fused_experts=args.fused_experts)
    info = {'out': str(out), 'preset': preset.name, 'format': args.fmt, 'seed': args.seed,
            'dtype': args.dtype, 'params': preset.param_counts()['total'],
            'shapes': {'vision': asdict(preset.vision), 'text': asdict(preset.text)},
            'seconds': round(time.perf_counter() - start, 1)}
    print(json.dumps(info))


if __name__ == '__main__':
    main()
