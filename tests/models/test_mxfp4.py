"""MXFP4 expert weights (GPT-OSS's ``*_blocks`` / ``*_scales``): the dequantisation against
transformers' converter and a naive one, and a checkpoint carrying them loads the same model as
one carrying the dequantised bf16 tensors, at tp = 1."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from vlmdeploy.config import ModelConfig
from vlmdeploy.models import mxfp4
from vlmdeploy.models.build import build_model
from vlmdeploy.testing.checkpoint import make_checkpoint


def random_packed(e: int, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (e, n, k // 32, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(120, 132, (e, n, k // 32), generator=gen, dtype=torch.uint8)
    return blocks, scales


def naive(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    e, n, g, _ = blocks.shape
    out = torch.empty(e, g * 32, n)
    for i in range(e):
        for r in range(n):
            for b in range(g):
                for j in range(32):
                    byte = int(blocks[i, r, b, j // 2])
                    code = byte & 15 if j % 2 == 0 else byte >> 4
                    out[i, b * 32 + j, r] = mxfp4.E2M1[code] * 2.0 ** (int(scales[i, r, b]) - 127)
    return out


def test_dequantize_matches_naive_and_transformers():
    blocks, scales = random_packed(2, 3, 64, seed=0)
    w = mxfp4.dequantize(blocks, scales)
    assert w.shape == (2, 64, 3)
    assert torch.equal(w, naive(blocks, scales))
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    assert torch.equal(w, theirs)


def test_mxfp4_checkpoint_loads_as_dequantised(tmp_path):
    """The same experts written packed and written dequantised load to equal parameters."""
    over = {"intermediate_size": 32}  # K of down_proj must be whole blocks of 32
    packed = make_checkpoint(tmp_path / "packed", "tiny-gpt-oss", "hf", seed=0,
                             text_overrides=over)
    plain = make_checkpoint(tmp_path / "plain", "tiny-gpt-oss", "hf", seed=0,
                            text_overrides=over)
    files = [packed / "model.safetensors", plain / "model.safetensors"]
    tensors = [load_file(f) for f in files]
    for i, name in enumerate([n for n in tensors[0] if n.endswith("experts.gate_up_proj")
                              or n.endswith("experts.down_proj")]):
        e, k, n = tensors[0][name].shape
        blocks, scales = random_packed(e, n, k, seed=i)
        del tensors[0][name]
        tensors[0][name + "_blocks"], tensors[0][name + "_scales"] = blocks, scales
        tensors[1][name] = mxfp4.dequantize(blocks, scales)
    for f, t in zip(files, tensors, strict=True):
        save_file(t, str(f))
    models = [build_model(p, ModelConfig.from_pretrained(p), torch.float32, torch.device("cpu"))
              for p in (packed, plain)]
    a, b = (dict(m.named_parameters()) for m in models)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
