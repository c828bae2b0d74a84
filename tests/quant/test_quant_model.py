"""A quantised model computes nearly the full-precision model's function, and its fast paths
(the row path for a few tokens, the lm_head of one row) compute exactly its plain function: fp32
on the CPU, through the references."""

from __future__ import annotations

import functools

import pytest
import torch

from tests.models.test_fast_paths import Cache, step
from vlmdeploy.config import ModelConfig
from vlmdeploy.models import fast_paths
from vlmdeploy.models.build import build_model
from vlmdeploy.models.internvl import InternVLForCausalLM
from vlmdeploy.quant.spec import resolve

PROMPTS = [(0, 0, torch.arange(5, 30)), (1, 0, torch.arange(100, 120))]  # 45 tokens: general


@functools.cache
def built(path: str, model_format: str | None) -> InternVLForCausalLM:
    cfg = ModelConfig.from_pretrained(path)
    return build_model(path, cfg, torch.float32, torch.device("cpu"),
                       quant=resolve(model_format, cfg))


def logits_of(path: str, model_format: str | None, monkeypatch, row_tokens: int) -> list:
    """Logits of a prefill step, a two-row decode step (row path when ``row_tokens`` >= 2) and a
    one-row step, from an empty cache."""
    monkeypatch.setattr(fast_paths, "ROW_PATH_TOKENS", row_tokens)
    model = built(path, model_format)
    Cache(model, 2)
    out = [step(model, PROMPTS)]
    out.append(step(model, [(0, 25, torch.tensor([7])), (1, 20, torch.tensor([9]))]))
    out.append(step(model, [(1, 21, torch.tensor([11]))]))
    return out


# Relative error of the (centred) logits of a random-weight model after two layers; measured
# 0.084-0.087 for FP8 (each operand of a product within 2^-4 of its value) and 0.20-0.23 for AWQ
# (4 bits rounded to nearest without calibration). A misplaced block or nibble gives ~1.
@pytest.mark.parametrize("fmt,model_format,bound", [
    ("bf16", "fp8", 0.12),
    ("fp8", None, 0.12),
    ("awq", None, 0.35),
])
def test_quantised_logits_stay_near_full_precision(quant_ckpts, monkeypatch, fmt, model_format,
                                                   bound):
    full = logits_of(quant_ckpts["bf16"], None, monkeypatch, 16)
    quant = logits_of(quant_ckpts[fmt], model_format, monkeypatch, 16)
    for a, b in zip(quant, full, strict=True):
        centred_a, centred_b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
        err = ((centred_a - centred_b).norm() / centred_b.norm()).item()
        assert 0 < err < bound, err  # changed (it is quantised), but not by much


@pytest.mark.parametrize("fmt", ["fp8", "awq"])
def test_row_path_of_a_quantised_model_equals_its_general_path(quant_ckpts, monkeypatch, fmt):
    calls = []
    real = fast_paths.forward_row
    monkeypatch.setattr(fast_paths, "forward_row",
                        lambda layer, h, cos, sin: calls.append(h.shape[0]) or
                        real(layer, h, cos, sin))
    rows = logits_of(quant_ckpts[fmt], None, monkeypatch, 16)
    assert calls == [2, 2, 1, 1]  # two layers of the two-row step, two of the one-row step
    general = logits_of(quant_ckpts[fmt], None, monkeypatch, 0)
    for a, b in zip(rows, general, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
