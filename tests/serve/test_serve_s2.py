"""benchmarks/s2.py end to end against the app around the FakePipeline on a real socket: every
rate's requests answered, W4's per-request settings sent as OpenAI fields, Poisson arrivals."""

from __future__ import annotations

import asyncio
import math

from fake_pipeline import FakePipeline
from serve_helpers import run_live

from benchmarks import results, s2
from vlmdeploy.serve import create_app


def test_s2_curve_against_a_live_server():
    fake = FakePipeline(token_delay=0.001, session_len=100_000)
    with run_live(create_app(fake)) as url:
        args = s2.parse_args(["--url", url, "--rates", "inf,40", "--num-requests", "5",
                              "--session-len", "1024", "--model-shape", "tiny"])
        curve = asyncio.run(s2.run(args))
    assert set(curve) == {"inf", "40.0"}
    for point in curve.values():
        assert point["requests"] == 5 and point["failed"] == 0
        assert point["req_per_s"] > 0 and point["ttft_p50_ms"] <= point["ttft_p99_ms"]
    configs = [p.gen_config for p in fake.prepared]
    assert len(configs) == 2 + 5 + 5  # warm-up, then each rate
    assert all(c.ignore_eos for c in configs) and any(c.temperature > 0 for c in configs)
    assert any(c.temperature == 0 for c in configs)  # W4's greedy requests
    rows = s2.history_rows(curve, args, results.Stamp("d", "t", "c", "dev"))
    assert {r["workload"] for r in rows} == {"S2@inf", "S2@40.0"}


def test_poisson_arrivals_have_the_asked_rate_and_inf_sends_at_once():
    times = s2.arrivals(4000, 8.0, seed=3)
    assert times == sorted(times) and abs(4000 / times[-1] - 8.0) < 0.5
    assert s2.arrivals(3, math.inf, seed=0) == [0.0, 0.0, 0.0]


def test_greedy_w4_requests_become_temperature_zero():
    body = s2.body_of([{"role": "user", "content": "hi"}],
                      {"max_new_tokens": 9, "ignore_eos": True}, "m")
    assert body["temperature"] == 0.0 and body["max_tokens"] == 9 and body["ignore_eos"]
    sampled = s2.body_of([], {"max_new_tokens": 2, "do_sample": True, "temperature": 0.7,
                              "top_k": 20, "random_seed": 5}, "m")
    assert (sampled["temperature"], sampled["top_k"], sampled["seed"]) == (0.7, 20, 5)
