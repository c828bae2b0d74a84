"""The engine benchmark script runs end to end (tiny checkpoint, CPU, a handful of requests) and
writes its table, so a device session spends its time measuring, not debugging the harness."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "engine.py"


def test_engine_benchmark_smoke(tiny_ckpts, tmp_path):
    spec = importlib.util.spec_from_file_location("bench_engine", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out, raw = tmp_path / "bench.md", tmp_path / "bench.json"
    lmdeploy = tmp_path / "results.json"  # the reference harness's result format
    lmdeploy.write_text(
        json.dumps(
            {
                "w1": {"ttft_ms": 100.0, "tpot_ms": 6.7},
                "w2": {"req_per_s": 7.8},
                "w3": {"output_tok_per_s": 9300.0},
            }
        )
    )
    args = f"--model {tiny_ckpts['hf']} --n2 2 --n3 2 --session-len 4096 --baseline"
    bench.main([*args.split(), "--out", str(out), "--json", str(raw), "--lmdeploy", str(lmdeploy)])
    res = json.loads(raw.read_text())
    assert res["w1"]["output_tokens"] == 512 and res["w1"]["tpot_ms"] > 0
    assert res["w2"]["requests"] == 2 and res["w3"]["output_tokens_per_s"] > 0
    assert res["transformers_w1"]["tpot_ms"] > 0
    table = out.read_text()
    assert "| W1 TPOT ms |" in table and "| 6.70 |" in table and "| 9,300 |" in table
    svg = next(tmp_path.glob("benchmarks-*.svg")).read_text()
    assert svg.startswith("<svg") and "W3 output tokens/s" in svg
