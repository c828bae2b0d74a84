"""The quantised-weight GEMMs at InternVL3.5-8B's four projection shapes against cuBLAS in bf16:
blocked FP8 through this package's Triton kernel and through cuBLAS's ``torch._scaled_mm``
(``VLMDEPLOY_FP8_GEMM`` picks one in the engine), and AWQ's W4A16 (the GEMV at one row, the GEMM
above).

Each case counts the bytes it must move (its weights and scales once, the activations in and out)
and its FLOPs; "% roofline" is ``max(bytes / copy bandwidth, flops / bf16 matmul rate)`` over the
time, with both ceilings measured at the start (FP8 tensor cores can beat the bf16 rate: more
than 100% there is real). FP8 times include the activations' quantisation, as the layer runs it.
Times are medians of CUDA-graph replays over rotating inputs (``benchmarks/gpu_timing.py``); each
case is checked against its PyTorch reference once. Prints a markdown table and appends to a
results CSV (``--csv``):

    python -m benchmarks.quant_gemm [--csv results.csv] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import results
from benchmarks.gpu_timing import (
    DEV,
    DTYPE,
    device_line,
    graph_ms,
    measure_ceilings,
    n_sets,
    rel_err,
)
from vlmdeploy.kernels import quant_reference as ref
from vlmdeploy.kernels.fp8_gemm_kernel import fp8_linear_triton
from vlmdeploy.kernels.w4a16_kernel import w4a16_linear_triton
from vlmdeploy.quant.awq import quantize_rtn

SHAPES = {"qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "gate_up_proj": (24576, 4096),
          "down_proj": (4096, 12288)}  # (N, K) of Qwen3-8B's projections
PROVIDERS = ("cublas-bf16", "fp8-triton", "fp8-scaled_mm", "w4a16-triton")


@dataclasses.dataclass
class Row:
    layer: str
    tokens: int
    provider: str
    bytes: float
    flops: float
    ms: float
    err: float


def weight_bytes(provider: str, n: int, k: int) -> float:
    if provider.startswith("fp8"):
        return n * k + (n // 128) * (k // 128) * 4
    if provider.startswith("w4a16"):
        return n * k / 2 + (k // 128) * n * (2 + 0.5)  # words, fp16 scales, packed zeros
    return n * k * 2


def bench(layer: str, m: int, provider: str) -> Row:
    n, k = SHAPES[layer]
    w = torch.randn(n, k, device=DEV) * k**-0.5
    nbytes = weight_bytes(provider, n, k) + m * (k + n) * 2
    if provider == "cublas-bf16":
        wb = w.to(DTYPE)
        call, check = (lambda x: F.linear(x, wb)), (lambda x: F.linear(x.float(), w))
    elif provider.startswith("fp8"):
        q, s = ref.fp8_quantize_blocks(w)
        backend = provider.split("-")[1]
        call = lambda x: fp8_linear_triton(x, q, s, backend=backend)  # noqa: E731
        check = lambda x: ref.fp8_linear(x.float(), q, s)  # noqa: E731
    else:
        qw, qz, sc = quantize_rtn(w)
        call = lambda x: w4a16_linear_triton(x, qw, qz, sc, 128)  # noqa: E731
        check = lambda x: ref.w4a16_linear(x, qw, qz, sc, 128)  # noqa: E731
    inputs = [torch.randn(m, k, device=DEV, dtype=DTYPE) for _ in range(n_sets(nbytes))]
    ms = graph_ms([lambda x=x: call(x) for x in inputs])
    err = rel_err(call(inputs[0]), check(inputs[0]))
    return Row(layer, m, provider, nbytes, 2 * m * n * k, ms, err)


def render(rows: list[Row], bw: float, rate: float) -> str:
    lines = ["# Quantised-weight GEMMs", "",
             f"Device: {device_line()}. Ceilings: copy {bw / 1e12:.2f} TB/s, bf16 matmul "
             f"{rate / 1e12:.0f} TFLOP/s. Times in µs (CUDA-graph replays).", "",
             "| layer | tokens | provider | µs | TB/s | TFLOP/s | % roofline | err |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        sec = r.ms * 1e-3
        floor = max(r.bytes / bw, r.flops / rate)
        lines.append(f"| {r.layer} | {r.tokens} | {r.provider} | {r.ms * 1e3:,.1f} | "
                     f"{r.bytes / sec / 1e12:.2f} | {r.flops / sec / 1e12:.0f} | "
                     f"{100 * floor / sec:.0f}% | {r.err:.1e} |")
    return "\n".join(lines) + "\n"


def history_rows(rows: list[Row], st: results.Stamp) -> list[dict]:
    return [results.row(st, "InternVL3.5-8B", f"{r.layer} GEMM: T={r.tokens}", "time_us",
                        r.provider, r.ms * 1e3, "us", "includes activation quantisation"
                        if r.provider.startswith("fp8") else "") for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", help="append the run's rows to this results CSV")
    parser.add_argument("--out", help="write the markdown table to this file")
    parser.add_argument("--quick", action="store_true", help="fewer cases (a smoke run)")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    args = parser.parse_args()
    torch.manual_seed(0)
    bw, rate = measure_ceilings()
    tokens = [1, 64, 2048] if args.quick else [1, 2, 16, 64, 256, 2048, 8192]
    rows = []
    for layer in SHAPES:
        for m in tokens:
            for provider in args.providers.split(","):
                try:
                    row = bench(layer, m, provider)
                except Exception:  # report the rest even if one provider cannot run here
                    traceback.print_exc()
                    continue
                rows.append(row)
                print(f"{layer:13s} T={m:5d} {provider:14s} {row.ms * 1e3:9.1f} us "
                      f"err {row.err:.1e}", flush=True)
            torch.cuda.empty_cache()
    text = render(rows, bw, rate)
    if args.out:
        Path(args.out).write_text(text)
    if args.csv:
        results.append(args.csv, history_rows(rows, results.stamp(device_line())))
    print(text)


if __name__ == "__main__":
    main()
