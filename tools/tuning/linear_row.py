"""One-row linear layers at InternVL3.5-8B shapes: the fused Triton ``linear_row`` against cuBLAS.

Part 1 sweeps ``(BLOCK_N, BLOCK_K, num_warps)`` for each of the language model's four weight shapes
(one row, plain product) and times cuBLAS's ``F.linear`` beside it. Part 2 times one decoder
layer's projections as the engine runs them: cuBLAS with the separate RMSNorm, SiLU-and-mul and
residual kernels, against four ``linear_row`` calls with those fused in (attention left out of
both). Every time is a median over CUDA-graph replays that rotate over enough weight copies to
defeat the L2 cache, so each call streams its weights from HBM. Prints markdown tables.

Part 3 (``--rows 1,4,16``) compares cuBLAS, the row kernel and the tensor-core variant at a few
rows (small-batch decode).

The engine's ``ROW_CONFIG`` and ``choose_dot_config`` (``vlmdeploy/kernels/linear_row_kernel.py``)
come from these sweeps; rerun them on a new GPU before trusting those choices there.

    python -m tools.tuning.linear_row [--out linear_row.md] [--quick] [--rows 1,4,16]
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.gpu_timing import DEV, DTYPE, device_line, graph_ms, measure_ceilings, today
from vlmdeploy.kernels import reference
from vlmdeploy.kernels.linear_row_kernel import ROW_CONFIG, linear_row_triton
from vlmdeploy.kernels.triton_ops import rms_norm_triton, silu_and_mul_triton

HIDDEN, INTER, QKV = 4096, 12288, 6144
SHAPES = {"qkv": (QKV, HIDDEN), "o_proj": (HIDDEN, HIDDEN), "gate_up": (2 * INTER, HIDDEN),
          "down": (HIDDEN, INTER)}
ROTATE_BYTES = 512 << 20


def weights(n: int, k: int) -> list[torch.Tensor]:
    count = max(2, -(-ROTATE_BYTES // (n * k * 2)))
    return [torch.randn(n, k, device=DEV, dtype=DTYPE) * 0.02 for _ in range(count)]


def time_configs(label: str, configs: list, calls) -> list[tuple[float, tuple]]:
    """(µs, config) for every config Triton can compile, fastest first; ``calls(config)`` gives
    the calls one graph replay makes (one per weight copy)."""
    timed = []
    for cfg in configs:
        try:
            us = graph_ms(calls(cfg)) * 1e3
        except Exception as exc:  # a config Triton cannot compile (registers, shared memory)
            print(f"{label} {cfg}: {type(exc).__name__}", flush=True)
            continue
        timed.append((us, cfg))
        print(f"{label} {cfg}: {us:.1f} us", flush=True)
    return sorted(timed)


def sweep(quick: bool) -> list[str]:
    configs = [c for c in itertools.product((2, 4, 8, 16), (512, 1024, 2048, 4096), (4, 8))
               if c[0] * c[1] <= 64 * 32 * c[2]]  # at most 64 fp32 accumulators a thread
    if quick:
        configs = [(4, 2048, 4), (2, 4096, 4), (16, 512, 4)]
    lines = ["| shape | N × K | MB | cuBLAS µs | TB/s | best linear_row (BLOCK_N, BLOCK_K, warps)"
             " | µs | TB/s | next best |", "|---|---|---:|---:|---:|---|---:|---:|---|"]
    for name, (n, k) in SHAPES.items():
        ws = weights(n, k)
        x = torch.randn(1, k, device=DEV, dtype=DTYPE)
        mb = n * k * 2 / 1e6
        blas = graph_ms([lambda w=w, x=x: F.linear(x, w) for w in ws]) * 1e3
        timed = time_configs(name, configs, lambda c, ws=ws, x=x: [
            lambda w=w: linear_row_triton(x, w, config=c, pdl=False) for w in ws])
        (best, cfg), rest = timed[0], timed[1:4]
        others = ", ".join(f"{c} {u:.1f}" for u, c in rest)
        lines.append(f"| {name} | {n} × {k} | {mb:.1f} | {blas:.1f} | {mb / blas:.2f} | {cfg} |"
                     f" {best:.1f} | {mb / best:.2f} | {others} |")
        print(lines[-1], flush=True)
    return lines


DOT_CONFIGS = [(16, 256, 4, 3), (32, 256, 4, 3), (32, 128, 4, 4), (64, 128, 4, 3),
               (16, 512, 4, 3), (64, 256, 8, 3)]  # (BLOCK_N, BLOCK_K, num_warps, num_stages)


def rows(counts: list[int]) -> list[str]:
    """A few rows (small-batch decode): cuBLAS, the row kernel (each row streams the weight) and
    the tensor-core kernel (one weight read for all rows), plain products."""
    lines = ["", "| shape | rows | cuBLAS µs | row kernel µs | best tensor-core config | µs |"
             " TB/s |", "|---|---:|---:|---:|---|---:|---:|"]
    for name, (n, k) in SHAPES.items():
        ws = weights(n, k)
        mb = n * k * 2 / 1e6
        for m in counts:
            x = torch.randn(m, k, device=DEV, dtype=DTYPE)
            blas = graph_ms([lambda w=w, x=x: F.linear(x, w) for w in ws]) * 1e3
            row = graph_ms([lambda w=w, x=x: linear_row_triton(x, w, config=ROW_CONFIG, pdl=False)
                            for w in ws]) * 1e3  # a config forces the row kernel at any row count
            timed = time_configs(f"{name} rows {m}", DOT_CONFIGS, lambda c, ws=ws, x=x: [
                lambda w=w: linear_row_triton(x, w, pdl=False, dot_config=c) for w in ws])
            best, cfg = timed[0]
            lines.append(f"| {name} | {m} | {blas:.1f} | {row:.1f} | {cfg} | {best:.1f} |"
                         f" {mb / best:.2f} |")
            print(lines[-1], flush=True)
    return lines


def layer(quick: bool) -> list[str]:
    """The four projections of a decoder layer for one token, as the engine chains them."""
    sets = []
    for _ in range(6 if quick else 12):  # 12 layers' weights: ~4.6 GB, far past the L2
        sets.append({name: torch.randn(n, k, device=DEV, dtype=DTYPE) * 0.02
                     for name, (n, k) in SHAPES.items()})
    nw1 = torch.ones(HIDDEN, device=DEV, dtype=DTYPE)
    nw2 = torch.ones(HIDDEN, device=DEV, dtype=DTYPE)
    h0 = torch.randn(1, HIDDEN, device=DEV, dtype=DTYPE)
    o_in = torch.randn(1, HIDDEN, device=DEV, dtype=DTYPE)

    def unfused(ws, h=h0):
        x, _ = rms_norm_triton(h, nw1, 1e-6)
        F.linear(x, ws["qkv"])
        x, h = rms_norm_triton(F.linear(o_in, ws["o_proj"]), nw2, 1e-6, h)
        y = F.linear(silu_and_mul_triton(F.linear(x, ws["gate_up"])), ws["down"])
        return y + h

    def fused(ws, h=h0, pdl=False):
        linear_row_triton(h, ws["qkv"], nw1, pdl=pdl)
        h = linear_row_triton(o_in, ws["o_proj"], residual=h, pdl=pdl)
        gu = linear_row_triton(h, ws["gate_up"], nw2, pdl=pdl)
        return linear_row_triton(gu, ws["down"], silu_mul=True, residual=h, pdl=pdl)

    err = (fused(sets[0]).float() - unfused(sets[0]).float()).abs().max().item()
    ref = reference.linear_row(o_in, sets[0]["o_proj"], residual=h0)
    assert torch.allclose(linear_row_triton(o_in, sets[0]["o_proj"], residual=h0).float(),
                          ref.float(), atol=2e-2, rtol=2e-2)
    mb = sum(n * k for n, k in SHAPES.values()) * 2 / 1e6
    a = graph_ms([lambda ws=ws: unfused(ws) for ws in sets]) * 1e3
    b = graph_ms([lambda ws=ws: fused(ws) for ws in sets]) * 1e3
    c = graph_ms([lambda ws=ws: fused(ws, pdl=True) for ws in sets]) * 1e3
    return ["", "| one layer's projections (1 row) | µs | TB/s |", "|---|---:|---:|",
            f"| cuBLAS + RMSNorm, SiLU, residual kernels | {a:.1f} | {mb / a:.2f} |",
            f"| four fused linear_row calls | {b:.1f} | {mb / b:.2f} |",
            f"| the same, launched with PDL | {c:.1f} | {mb / c:.2f} |",
            "", f"Largest difference between the two outputs: {err:.3g}."]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", help="also write the tables here")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rows", default="", help="row counts for the small-batch table, e.g. 1,4,16")
    args = ap.parse_args()
    bw, rate = measure_ceilings()
    lines = [f"# One-row linear layers ({today()})", "", f"Device: {device_line()}.",
             f"Copy ceiling {bw / 1e12:.2f} TB/s (read + write).", ""]
    lines += sweep(args.quick) + layer(args.quick)
    if args.rows:
        lines += rows([int(r) for r in args.rows.split(",")])
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
