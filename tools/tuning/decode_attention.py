"""A decode step's attention at InternVL3.5-8B shapes, the way the captured decode step runs it.

Per layer, the raw q/k/v of the step's tokens are normalised per head, rotated, stored into the
paged cache, and attended over each sequence's context. Two ways are timed:

* separate: ``qk_norm_rope_store`` (norm, RoPE, cache store) launches before the decode kernel;
* fused: the decode kernel normalises, rotates and stores itself (``decode_attention(norm_rope=)``).

Each over the decode kernel's tile configurations (BLOCK_N, warps, stages), alone and between the
layer's qkv and o_proj projections (``linear_row`` at one row, cuBLAS above), since under PDL a
kernel's neighbours change how it runs. Times are medians of CUDA-graph replays of 36 layers, each
with its own cache and weights, launched as in the engine (PDL on Hopper), so the total KV and
weight reads are past the L2. Prints a markdown table. The engine's launch choice
(``FUSE_MIN_SPLITS`` and the tile configs in ``vlmdeploy/kernels/decode_attention.py``) comes from
this sweep; rerun it on a new GPU before trusting that choice there.

    python -m tools.tuning.decode_attention [--out decode_attention.md] [--cases W1,W3]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.gpu_timing import DEV, DTYPE, device_line, graph_ms, today
from benchmarks.kernels import HEAD_DIM, HIDDEN, N_KV, N_Q, PAGE
from vlmdeploy.kernels import decode_attention as decode_mod
from vlmdeploy.kernels import reference
from vlmdeploy.kernels.linear_row_kernel import linear_row_triton
from vlmdeploy.kernels.qk_norm_rope_kernel import qk_norm_rope_store_triton
from vlmdeploy.kernels.rms_norm_kernel import rms_norm_triton

LAYERS = 36
SESSION_LEN = 8192  # the engine captures its decode graphs with max_kv_len = session_len
CASES = {"W1": (1, 512), "W3": (256, 600), "B16": (16, 2048), "B1-3k": (1, 3000),
         "B1-8k": (1, 8000), "B4": (4, 1000)}  # (batch, context)
CONFIGS = [(16, 4, 1), (16, 8, 1), (32, 4, 1), (32, 8, 1), (64, 4, 1), (64, 4, 3), (64, 8, 3)]


def layer_inputs(B: int, ctx: int, gen: torch.Generator) -> dict:
    """One layer's step: raw projections, norm weights, RoPE rows, a paged cache holding each
    sequence's context, and the new tokens' slots (the position after it)."""
    blocks = -(-(ctx + 1) // PAGE)
    cache = torch.randn(2, B * blocks, PAGE, N_KV, HEAD_DIM, device=DEV, dtype=DTYPE)
    tables = torch.arange(B * blocks, dtype=torch.int32).view(B, blocks).to(DEV)
    qkv = torch.randn(B, (N_Q + 2 * N_KV) * HEAD_DIM, generator=gen).to(DTYPE).to(DEV)
    pos = torch.full((B,), ctx, device=DEV)
    cos, sin = reference.rope_cos_sin(pos, HEAD_DIM, 1e6, DTYPE)
    slots = (tables[:, ctx // PAGE].long() * PAGE + ctx % PAGE).contiguous()
    w = torch.ones(HEAD_DIM, dtype=DTYPE, device=DEV)
    return dict(h=torch.randn(B, HIDDEN, device=DEV, dtype=DTYPE), qkv=qkv,
                w_qkv=torch.randn(qkv.shape[1], HIDDEN, device=DEV, dtype=DTYPE) * 0.02,
                w_o=torch.randn(HIDDEN, N_Q * HEAD_DIM, device=DEV, dtype=DTYPE) * 0.02,
                norm=torch.ones(HIDDEN, device=DEV, dtype=DTYPE), qw=w, kw=w, cos=cos, sin=sin,
                k_cache=cache[0], v_cache=cache[1],
                slots=slots, tables=tables,
                cu=torch.arange(B + 1, dtype=torch.int32, device=DEV),
                kv_lens=torch.full((B,), ctx + 1, dtype=torch.int32, device=DEV))


def split(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B = qkv.shape[0]
    q = qkv[:, :N_Q * HEAD_DIM].view(B, N_Q, HEAD_DIM)
    k = qkv[:, N_Q * HEAD_DIM:(N_Q + N_KV) * HEAD_DIM].view(B, N_KV, HEAD_DIM)
    return q, k, qkv[:, (N_Q + N_KV) * HEAD_DIM:].view(B, N_KV, HEAD_DIM)


def separate(x: dict, qkv: torch.Tensor | None = None) -> torch.Tensor:
    q, k, v = split(x["qkv"] if qkv is None else qkv)
    q = qk_norm_rope_store_triton(q, k, v, x["qw"], x["kw"], x["cos"], x["sin"], 1e-6,
                                  x["k_cache"], x["v_cache"], x["slots"])
    return decode_mod.decode_attention(q, x["k_cache"], x["v_cache"], x["cu"], x["kv_lens"],
                                       x["tables"], HEAD_DIM ** -0.5, max_kv_len=SESSION_LEN)


def fused(x: dict, qkv: torch.Tensor | None = None) -> torch.Tensor:
    q, k, v = split(x["qkv"] if qkv is None else qkv)
    return decode_mod.decode_attention(
        q, x["k_cache"], x["v_cache"], x["cu"], x["kv_lens"], x["tables"], HEAD_DIM ** -0.5,
        max_kv_len=SESSION_LEN,
        norm_rope=(k, v, x["qw"], x["kw"], x["cos"], x["sin"], 1e-6, x["slots"]), fuse=True)


def projected(x: dict, attend) -> torch.Tensor:
    """qkv projection (with its RMSNorm), attention, o_proj with the residual: the part of a
    layer around the attention, as the engine runs it."""
    h = x["h"]
    if h.shape[0] == 1:
        qkv = linear_row_triton(h, x["w_qkv"], x["norm"])
        return linear_row_triton(attend(x, qkv).flatten(1), x["w_o"], residual=h)
    qkv = F.linear(rms_norm_triton(h, x["norm"], 1e-6)[0], x["w_qkv"])
    return F.linear(attend(x, qkv).flatten(1), x["w_o"]) + h


def time_case(B: int, ctx: int) -> list[str]:
    gen = torch.Generator().manual_seed(B)
    torch.manual_seed(B)
    layers = [layer_inputs(B, ctx, gen) for _ in range(LAYERS)]
    err = (fused(layers[0]).float() - separate(layers[0]).float()).abs().max().item()
    default = decode_mod._tile_config
    rows = []
    try:
        for bn, w, s in CONFIGS:
            decode_mod._tile_config = lambda q, f, c=dict(BLOCK_N=bn, num_warps=w, num_stages=s): c
            steps = (separate, fused, lambda x: projected(x, separate),
                     lambda x: projected(x, fused))
            t = [graph_ms([lambda f=f: [f(x) for x in layers]]) * 1e3 / LAYERS for f in steps]
            rows.append((t, (bn, w, s)))
            print(f"B={B} ctx={ctx} {(bn, w, s)}: " + ", ".join(f"{v:.2f}" for v in t), flush=True)
    finally:
        decode_mod._tile_config = default
    now = default(layers[0]["qkv"], True)  # the fused launch's
    now = (now["BLOCK_N"], now["num_warps"], now["num_stages"])
    lines = [f"| {cfg}{' (default)' if cfg == now else ''} | " + " | ".join(f"{v:.2f}" for v in t)
             + " |" for t, cfg in rows]
    return lines + ["", f"Largest difference fused against separate: {err:.3g}.", ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="also write the table here")
    ap.add_argument("--cases", default=",".join(CASES), help="of " + ", ".join(CASES))
    args = ap.parse_args()
    lines = [f"# A decode step's attention ({today()})", "", f"Device: {device_line()}.", "",
             "µs per layer, medians over graph replays of 36 layers (PDL as in the engine), by the "
             "decode kernel's (BLOCK_N, warps, stages). The engine runs the fused launch with "
             "the config marked default when each context is split "
             f"{decode_mod.FUSE_MIN_SPLITS} or more ways (a few sequences), else the separate one "
             "with (64, 4, 3).", ""]
    for label in args.cases.split(","):
        B, ctx = CASES[label]
        lines += [f"## {label}", "", "| config | separate | fused | qkv + separate + o_proj | "
                  "qkv + fused + o_proj |", "|---|---:|---:|---:|---:|"]
        lines += time_case(B, ctx)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
