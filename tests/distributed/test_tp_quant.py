"""Quantised weights under tensor parallelism compute the one-rank quantised model's function: at
tp = 2 (gloo, one spawned process per rank, fp32) every rank's logits equal tp = 1's, for FP8
quantised on load, FP8 stored and AWQ, over steps on the general path, the row path and one row.
The blocks and groups of a rank are the one-rank model's, so only the order of sums differs."""

from __future__ import annotations

import pytest
import torch
from spawn import run_ranks
from test_tp_model import STEPS, bind_cache, step

from tests.quant.checkpoints import write_quant_checkpoints
from vlmdeploy.config import ModelConfig
from vlmdeploy.distributed.state import tp_size
from vlmdeploy.models.build import build_model
from vlmdeploy.quant.linear import is_quantized
from vlmdeploy.quant.spec import resolve

TOL = 1e-3  # fp32 sums in another order; an activation on an fp8 rounding boundary may flip


@torch.inference_mode()
def rank_logits(rank: int, size: int, cases: dict[str, tuple[str, str | None]]) -> dict:
    assert tp_size() == size
    out = {}
    for name, (path, model_format) in cases.items():
        cfg = ModelConfig.from_pretrained(path)
        model = build_model(path, cfg, torch.float32, torch.device("cpu"),
                            quant=resolve(model_format, cfg))
        assert is_quantized(model.language_model.model.layers[0].mlp.down_proj)
        bind_cache(model, num_seqs=4)
        size_px = cfg.vision.image_size
        pixels = torch.randn(1, 3, size_px, size_px, generator=torch.Generator().manual_seed(0))
        image = model.encode_images(pixels).flatten(0, 1)
        ids = torch.randint(cfg.text.vocab_size, (4, 64),
                            generator=torch.Generator().manual_seed(1))
        logits, used = [], 0
        for batch in STEPS:
            got, used = step(model, batch, ids, image, used)
            logits.append(got)
        out[name] = logits
    return out


@pytest.fixture(scope="module")
def quant_ckpts(tmp_path_factory) -> dict[str, str]:
    return write_quant_checkpoints(tmp_path_factory.mktemp("quant"))


def test_quantised_tensor_parallel_logits_equal_one_rank(quant_ckpts):
    cases = {"fp8 on load": (quant_ckpts["bf16"], "fp8"), "fp8": (quant_ckpts["fp8"], None),
             "awq": (quant_ckpts["awq"], None)}
    reference = rank_logits(0, 1, cases)
    for rank, got in enumerate(run_ranks(rank_logits, 2, cases, timeout=150)):
        for name, ref in reference.items():
            for i, (a, b) in enumerate(zip(got[name], ref, strict=True)):
                err = (a - b).abs().max().item()
                assert err <= TOL * b.abs().max().item(), f"{name}, rank {rank}, step {i}: {err}"
