"""S1's rows for the history, from a run's samples (the run itself is tested against a live server
in tests/serve/test_serve_benchmark.py)."""

from __future__ import annotations

import math

from benchmarks import results, serving


def test_history_rows_of_an_s1_run():
    result = serving.Result([serving.Sample(True, 0.5, 0.02, 100, 2700),
                             serving.Sample(True, 1.5, 0.04, 100, 2700),
                             serving.Sample(False, error="HTTP 500")], wall_s=4.0)
    args = serving.parse_args(["--num-requests", "3", "--concurrency", "2", "--max-tokens", "100",
                               "--model-shape", "InternVL3.5-8B"])
    args.model = "ivl8b-hf"
    st = results.Stamp("2026-12-01", "10:00:00", "abc", "H100")
    rows = {r["metric"]: r for r in serving.history_rows(result, args, st)}
    assert rows["requests_per_s"]["value"] == "0.5" and rows["failed_requests"]["value"] == "1"
    assert rows["output_tokens_per_s"]["value"] == "50"
    assert float(rows["ttft_p50_ms"]["value"]) == 1000.0
    assert all(r["workload"] == "S1" and r["system"] == "vlmdeploy" for r in rows.values())
    assert "concurrency 2" in rows["ttft_p99_ms"]["note"]


def test_metrics_without_samples_are_left_out():
    result = serving.Result([serving.Sample(True, 0.5, None, 1, 10)], wall_s=1.0)
    args = serving.parse_args([])
    args.model = "m"
    rows = serving.history_rows(result, args, results.Stamp("d", "t", "", "dev"))
    assert math.isnan(result.summary()["tpot_p50_ms"])
    assert {r["metric"] for r in rows} == {"requests_per_s", "output_tokens_per_s", "ttft_p50_ms",
                                           "ttft_p99_ms", "failed_requests"}
