"""The kernel benchmark's rows for the history: every provider's time, our kernel's share of its
roofline against the ceilings measured in the same run."""

from __future__ import annotations

import pytest

from benchmarks import kernels, results


def test_history_rows_of_a_kernel_run():
    st = results.Stamp("2026-12-01", "10:00:00", "abc", "H100")
    decode = kernels.Row("paged decode", "B=1, ctx 512", bytes=3e6, flops=0.0, ours_ms=0.002,
                         ref_ms=0.5, sdpa_ms=0.0025, sdpa_note="flash, native GQA")
    gemm_like = kernels.Row("paged prefill", "1 prompt", bytes=0.0, flops=1e9, ours_ms=0.004,
                            cudnn_ms=0.002, cudnn_note="")
    rows = kernels.history_rows([decode, gemm_like], bw=3e12, rate=5e14, st=st)
    got = {(r["workload"], r["metric"], r["system"]): r for r in rows}
    assert got[("device ceiling", "copy_tb_per_s", "device")]["value"] == "3"
    assert got[("device ceiling", "bf16_matmul_tflop_per_s", "device")]["value"] == "500"
    d = "paged decode: B=1, ctx 512"
    assert float(got[(d, "time_us", "vlmdeploy")]["value"]) == pytest.approx(2.0)
    assert float(got[(d, "roofline_pct", "vlmdeploy")]["value"]) == pytest.approx(50.0)  # 1 / 2 µs
    assert got[(d, "time_us", "sdpa-flash")]["note"] == "flash, native GQA"
    p = "paged prefill: 1 prompt"
    assert float(got[(p, "roofline_pct", "vlmdeploy")]["value"]) == pytest.approx(50.0)  # FLOPs
    assert (p, "time_us", "torch-reference") not in got and (p, "time_us", "sdpa-cudnn") in got
    assert all(r["commit"] == "abc" and r["model_shape"] == "InternVL3.5-8B" for r in rows)


def test_moe_rows_name_their_models():
    st = results.Stamp("2026-12-01", "10:00:00", "abc", "H100")
    rows = kernels.history_rows(
        [kernels.Row("fused_moe", "T=1", 1e6, 1e6, 0.01),
         kernels.Row("fused_moe gpt-oss", "T=1", 1e6, 1e6, 0.01)], bw=3e12, rate=5e14, st=st)
    shapes = {r["workload"]: r["model_shape"] for r in rows if r["metric"] == "time_us"}
    assert shapes == {"fused_moe: T=1": "InternVL3.5-30B-A3B",
                      "fused_moe gpt-oss: T=1": "InternVL3.5-GPT-OSS-20B-A4B"}
