"""GPT-OSS at tp = 2 (gloo, CPU, fp32) computes tp = 1's function: heads and their sinks split,
every expert split along its intermediate dimension (a contiguous run of the interleaved gate/up
columns), one all-reduce after the experts' combine, the down biases added once. The steps of
:mod:`test_tp_model` run past the tiny model's window of 8, with image rows, prefill and decode."""

from __future__ import annotations

import pytest
import torch
from spawn import run_ranks
from test_tp_model import STEPS, run_steps

from vlmdeploy.distributed.state import tp_size
from vlmdeploy.testing.checkpoint import make_checkpoint

TOL = 1e-4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("gpt-oss-tp")
    return {fmt: str(make_checkpoint(root / fmt, "tiny-gpt-oss", fmt, seed=1))
            for fmt in ("original", "hf")}


def rank_steps(rank: int, size: int, paths: dict[str, str]) -> dict[str, dict]:
    assert tp_size() == size
    return {name: run_steps(path) for name, path in paths.items()}


def test_tp2_logits_equal_one_rank(checkpoints):
    reference = rank_steps(0, 1, checkpoints)
    ranks = run_ranks(rank_steps, 2, checkpoints, timeout=150)
    for name, ref in reference.items():
        for rank, got in enumerate(ranks):
            got, where = got[name], f"{name}, rank {rank} of 2"
            for i, (a, b) in enumerate(zip(got["logits"], ref["logits"], strict=True)):
                assert a.shape == b.shape and a.shape[0] == len(STEPS[i]), where
                assert torch.isfinite(a).all(), where
                assert (a - b).abs().max() <= TOL, f"{where}, step {i}: {(a - b).abs().max()}"
