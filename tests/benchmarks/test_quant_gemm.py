"""The quantised-GEMM benchmark's bookkeeping: the bytes each format must move, and its rows for
the results history."""

from __future__ import annotations

import pytest

from benchmarks import quant_gemm, results


def test_weight_bytes_per_format():
    n, k = quant_gemm.SHAPES["o_proj"]
    assert quant_gemm.weight_bytes("cublas-bf16", n, k) == 2 * n * k
    assert quant_gemm.weight_bytes("fp8-triton", n, k) == n * k + 32 * 32 * 4  # + block scales
    assert quant_gemm.weight_bytes("fp8-scaled_mm", n, k) == n * k + 32 * 32 * 4
    assert quant_gemm.weight_bytes("w4a16-triton", n, k) == n * k / 2 + 32 * n * 2.5


def test_history_rows_of_a_run():
    st = results.Stamp("2026-12-01", "10:00:00", "abc", "H100")
    rows = quant_gemm.history_rows(
        [quant_gemm.Row("down_proj", 16, "fp8-scaled_mm", 1e6, 1e9, 0.012, 1e-3),
         quant_gemm.Row("down_proj", 16, "cublas-bf16", 2e6, 1e9, 0.02, 0.0)], st)
    assert [r["system"] for r in rows] == ["fp8-scaled_mm", "cublas-bf16"]
    assert all(r["workload"] == "down_proj GEMM: T=16" and r["metric"] == "time_us"
               for r in rows)
    assert float(rows[0]["value"]) == pytest.approx(12.0)
    assert "activation quantisation" in rows[0]["note"] and rows[1]["note"] == ""
