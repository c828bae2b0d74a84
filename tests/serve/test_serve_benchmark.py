"""benchmarks/serving.py (S1) end to end against the app around the FakePipeline on a real socket:
token counts from usage, latency percentiles, and the markdown row it appends."""

from __future__ import annotations

import asyncio
import importlib.util
import math
import sys
from pathlib import Path

from fake_pipeline import FakePipeline
from serve_helpers import run_live

from vlmdeploy.serve import ServerConfig, create_app

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "serving.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("serving_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_s1_benchmark_against_a_live_server(tmp_path):
    bench = load_benchmark()
    fake = FakePipeline(token_delay=0.005, session_len=100_000)
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n")
    with run_live(create_app(fake, ServerConfig(api_keys=("sk-bench",)))) as url:
        args = bench.parse_args(["--url", url, "--api-key", "sk-bench", "--num-requests", "6",
                                 "--concurrency", "3", "--max-tokens", "5", "--image-size", "64",
                                 "--warmup", "1", "--device-line", "CPU test box",
                                 "--append", str(out)])
        result = asyncio.run(bench.run(args))
    summary = result.summary()
    assert summary["requests"] == 6 and summary["failed"] == 0
    assert all(s.completion_tokens == 5 for s in result.samples)  # ignore_eos, from usage
    assert summary["req_per_s"] > 0 and summary["output_tok_per_s"] > 0
    assert summary["ttft_p50_ms"] <= summary["ttft_p99_ms"]
    assert not math.isnan(summary["tpot_p50_ms"]) and summary["tpot_p50_ms"] >= 5 * 0.9
    assert len({p.prompt[0]["content"][0]["image_url"]["url"] for p in fake.prepared}) == 7
    assert all(p.gen_config.ignore_eos and p.gen_config.temperature == 0 for p in fake.prepared)
    bench.append_row(out, bench.markdown_row(result, args))
    bench.append_row(out, bench.markdown_row(result, args))
    text = out.read_text()
    assert text.count("| date | device |") == 1 and text.count("| CPU test box |") == 2
    assert "fake-model" in text


def test_failures_are_counted_not_hidden(tmp_path):
    bench = load_benchmark()
    with run_live(create_app(FakePipeline(fail_after=1))) as url:
        args = bench.parse_args(["--url", url, "--num-requests", "2", "--concurrency", "2",
                                 "--max-tokens", "3", "--image-size", "32", "--warmup", "0"])
        result = asyncio.run(bench.run(args))
    assert result.failed == 2 and all(s.error for s in result.samples)
