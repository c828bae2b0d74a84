"""Qwen3-MoE under tensor parallelism: at tp = 2 (gloo, fp32) every rank's logits equal tp = 1's
within 1e-4 over the steps of ``test_tp_model`` (general path, row path, one row), with the
experts split along their intermediate width and stored per expert or fused; a tp = 2 engine
gives tp = 1's greedy tokens with preemption and prefix caching in play (``test_tp_engine``'s
schedule); and the plan refuses an expert width the ranks cannot split."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from spawn import run_ranks
from test_tp_engine import _run
from test_tp_model import STEPS, TOL, rank_steps

from tests.conftest import solid_image
from vlmdeploy.config import ModelConfig
from vlmdeploy.distributed.state import TPGroup, use_group
from vlmdeploy.models.tp_plan import check_tensor_parallel
from vlmdeploy.testing.checkpoint import make_checkpoint


@pytest.fixture(scope="module")
def moe_checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tp-moe")
    return {
        "original": str(make_checkpoint(root / "original", "tiny-moe", "original", seed=1)),
        "hf-fused": str(
            make_checkpoint(root / "hf-fused", "tiny-moe", "hf", seed=1, fused_experts=True)
        ),
    }


def test_tensor_parallel_moe_logits_equal_one_rank(moe_checkpoints):
    reference = rank_steps(0, 1, moe_checkpoints)
    ranks = run_ranks(rank_steps, 2, moe_checkpoints, timeout=150)
    for name, ref in reference.items():
        assert ref["row_path"] == [9] * 3 + [1] * 3, name  # both fast paths ran, 3 layers
        vocab = ModelConfig.from_pretrained(moe_checkpoints[name]).text.vocab_size
        for rank, got in enumerate(ranks):
            got, where = got[name], f"{name}, rank {rank} of 2"
            for i, (a, b) in enumerate(zip(got["logits"], ref["logits"], strict=True)):
                assert a.shape == b.shape == (len(STEPS[i]), vocab), where
                assert (a - b).abs().max() <= TOL, f"{where}, step {i}: {(a - b).abs().max()}"


def test_tensor_parallel_moe_engine_matches_one_rank(moe_checkpoints):
    pictures = [solid_image(300, 300, 1), None, None, solid_image(320, 320, 4)]
    ref_tokens, ref_logits, ref_stats = _run(moe_checkpoints["original"], 1, pictures)
    tokens, logits, stats = _run(moe_checkpoints["original"], 2, pictures)
    assert ref_stats["num_preemptions"] > 0
    assert tokens == ref_tokens
    common = logits.keys() & ref_logits.keys()
    assert len(common) >= sum(map(len, tokens))
    for key in common:
        torch.testing.assert_close(logits[key], ref_logits[key], atol=1e-4, rtol=0)


def test_each_rank_holds_its_slice_of_every_expert(moe_checkpoints):
    from vlmdeploy.models.build import build_model

    path = moe_checkpoints["hf-fused"]
    cfg = ModelConfig.from_pretrained(path)
    whole = build_model(path, cfg, torch.float32, torch.device("cpu"))
    full = whole.language_model.model.layers[2].mlp.experts
    inter = cfg.text.moe_intermediate_size // 2
    for rank in range(2):
        with use_group(TPGroup(rank, 2)):
            part = build_model(path, cfg, torch.float32, torch.device("cpu"))
        experts = part.language_model.model.layers[2].mlp.experts
        rows = slice(rank * inter, (rank + 1) * inter)
        gate, up = full.gate_up_proj.chunk(2, dim=1)
        assert torch.equal(experts.gate_up_proj, torch.cat([gate[:, rows], up[:, rows]], dim=1))
        assert torch.equal(experts.down_proj, full.down_proj[:, :, rows])


def test_check_tensor_parallel_checks_the_expert_width(moe_checkpoints):
    cfg = ModelConfig.from_pretrained(moe_checkpoints["original"])  # expert width 48
    check_tensor_parallel(cfg, 2)
    odd = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, moe_intermediate_size=50))
    with pytest.raises(ValueError, match="expert intermediate size 50"):
        check_tensor_parallel(odd, 4)
