"""W1's decode floor (``benchmarks.decode_floor``): the bytes a batch-1 decode step reads, counted
on our model and checked against a count made independently from transformers' model of the same
checkpoint — dense, Qwen3-MoE (only the routed experts' share) and GPT-OSS (expert biases too) —
and the floor's arithmetic and its row in the engine table."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import InternVLForConditionalGeneration

from benchmarks import engine_report as report
from benchmarks.decode_floor import decode_weight_bytes, floor_report
from vlmdeploy.config import ModelConfig
from vlmdeploy.models.build import build_model
from vlmdeploy.testing.checkpoint import make_checkpoint


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def transformers_count(path: str) -> int:
    """Every language-model weight once, the embedding table as one row unless lm_head shares it,
    and the tensors under ``.experts.`` at top_k / num_experts of their size."""
    hf = InternVLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    cfg = hf.config.text_config
    lm = hf.model.language_model
    share = (cfg.num_experts_per_tok, getattr(cfg, "num_experts", None)
             or getattr(cfg, "num_local_experts", None)) if hasattr(
        cfg, "num_experts_per_tok") else None
    tied = hf.lm_head.weight is lm.embed_tokens.weight
    total = _bytes(hf.lm_head.weight)
    for name, p in lm.named_parameters():
        if name.startswith("embed_tokens."):
            total += 0 if tied else p.shape[-1] * p.element_size()
        elif ".experts." in name:
            total += _bytes(p) * share[0] // share[1]
        else:
            total += _bytes(p)
    return total


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe", "tiny-gpt-oss"])
def test_decode_bytes_match_an_independent_count(tmp_path, preset):
    path = str(make_checkpoint(tmp_path / "ckpt", preset, "hf", seed=0))
    ours = build_model(path, ModelConfig.from_pretrained(path), torch.float32, torch.device("cpu"))
    got = decode_weight_bytes(ours.language_model)
    assert got == transformers_count(path)
    everything = sum(_bytes(p) for p in ours.language_model.parameters())
    assert got < everything  # an embedding row, or the experts' share, is all that is read


def test_tied_table_is_read_whole_and_once():
    emb = nn.Embedding(100, 8)
    head = nn.Linear(8, 100, bias=False)
    lm = nn.ModuleDict({"embed": emb, "head": head})
    assert decode_weight_bytes(lm) == (100 * 8 + 8) * 4  # separate: the head, one row
    head.weight = emb.weight
    assert decode_weight_bytes(lm) == 100 * 8 * 4


def test_experts_count_their_routed_share_only():
    class Experts(nn.Module):
        num_experts = 8

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(8, 4, 16))
            self.bias = nn.Parameter(torch.zeros(8, 4))
            self.odd = nn.Parameter(torch.zeros(3, 5))  # not per expert: read whole

    class Block(nn.Module):
        top_k = 2

        def __init__(self):
            super().__init__()
            self.router = nn.Linear(16, 8, bias=False)
            self.experts = Experts()

    got = decode_weight_bytes(Block())
    assert got == (8 * 16 + (8 * 4 * 16 + 8 * 4) * 2 // 8 + 15) * 4


def test_floor_report_and_its_table_row():
    lm = nn.Linear(1000, 1000, bias=False)  # 4 MB of fp32 weights
    r = floor_report(lm, bandwidth=2e12, tpot_ms=0.003)
    assert r["decode_weight_gb"] == 0.004 and r["copy_gb_s"] == 2000.0
    assert r["tpot_floor_ms"] == pytest.approx(0.002)
    assert r["tpot_over_floor"] == pytest.approx(1.5)
    res = {"model_shape": "InternVL3.5-30B-A3B", "settings": {},
           "w1": {"ttft_ms": 20.0, "tpot_ms": 0.003, **r}}
    table = report.markdown(res)
    assert "| W1 TPOT / weight-read floor | 1.50 | ≤ 1.4 | no |" in table
    assert "0.00 GB of weights read per batch-1 decode step at 2,000 GB/s" in table
    rows = report.history_rows(res)
    assert any(x["metric"] == "tpot_over_floor" and float(x["value"]) == 1.5 for x in rows)
