"""benchmarks/quant_accuracy.py: the sampler tap compares and forces what it should, and a run on
the tiny preset reports each format against bf16 on the same weights."""

from __future__ import annotations

import csv

import pytest
import torch

from benchmarks import quant_accuracy
from vlmdeploy.engine.sampling import SamplingParams, sample_async


def test_format_names_join_into_engine_settings():
    assert quant_accuracy.settings("bf16") == (None, 0)
    assert quant_accuracy.settings("fp8+kv8") == ("fp8", 8)
    assert quant_accuracy.settings("awq+kv4") == ("awq", 4)
    with pytest.raises(ValueError, match="unknown format 'int3'"):
        quant_accuracy.settings("int3")


def test_tap_compares_with_the_reference_and_feeds_its_tokens():
    tap = quant_accuracy.Tap(sample_async)
    reference = [torch.tensor([0.0, 1.0, 0.0]), torch.tensor([1.0, 0.0, 0.0])]
    tap.reset(reference, tokens=[2, 0])
    first = tap(torch.tensor([[0.0, 1.0, 0.0]]), [SamplingParams()], [[]], [0])
    second = tap(torch.tensor([[0.0, 1.0, 1.0]]), [SamplingParams()], [[]], [1])
    assert first.resolve()[0] == [2] and second.resolve()[0] == [0]  # forced, not the argmax
    assert [round(c.item(), 4) for c in tap.cos] == [1.0, 0.0]
    assert [bool(b) for b in tap.top1] == [True, False]
    tap.reset(record=True)
    free = tap(torch.tensor([[0.0, 0.0, 3.0]]), [SamplingParams()], [[]], [0])
    assert free.resolve()[0] == [2] and len(tap.rows) == 1 and not tap.cos


def test_tiny_run_reports_every_format_against_bf16(tmp_path):
    csv_path = tmp_path / "results.csv"
    res = quant_accuracy.main(["--preset", "tiny", "--formats", "bf16,kv8,kv4", "--tokens", "5",
                               "--prompts", "2", "--csv", str(csv_path)])
    assert set(res["formats"]) == {"bf16", "kv8", "kv4"}
    for fmt in ("kv8", "kv4"):
        r = res["formats"][fmt]
        assert r["steps"] == 10 and len(r["first_difference"]) == 2
        assert 0.99 < r["cosine_min"] <= r["cosine_mean"] < 1.0001
        assert 0.0 <= r["greedy_agreement"] <= 1.0
    assert res["formats"]["kv4"]["quant_policy"] == 4
    rows = list(csv.DictReader(csv_path.open()))
    assert {r["system"] for r in rows} == {"vlmdeploy kv8", "vlmdeploy kv4"}
    assert {r["metric"] for r in rows} >= {"cosine_mean", "greedy_agreement", "kv_cache_tokens"}
