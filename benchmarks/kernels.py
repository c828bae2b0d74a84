"""Per-kernel benchmark at InternVL3.5-8B shapes (the fused MoE at 30B-A3B's and at
GPT-OSS-20B-A4B's): the Triton kernels against the PyTorch reference path and, for attention,
torch's SDPA flash kernel on contiguous (unpaged) K/V (for whole prompts also SDPA's cuDNN
kernel).

Every case counts the fewest bytes it must move and the FLOPs it must do; with the copy bandwidth
and bf16 matmul rate measured at the start, ``max(bytes / bandwidth, flops / rate)`` is its floor
and "% roofline" is floor / measured time. Triton and SDPA times are medians of CUDA-graph replays
(launch gaps removed, as in the engine's captured decode) that rotate over enough independent input
sets to defeat the L2 cache; the reference path host-syncs, so it is timed eagerly with
``triton.testing.do_bench`` (median, L2 flushed). Each case also checks the kernel against the
reference once. Prints a markdown table (``--out`` writes it to a file) and appends the times
and the ceilings to a results CSV (``--csv``, see ``benchmarks/results.py``). Decode attention and
the KV store run over quantised caches too (``quant_policy`` int8, int4, fp8: their bytes are the
codes and the scales and zero points).

    python -m benchmarks.kernels [--csv results.csv] [--out kernels.md] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from benchmarks import results
from benchmarks.gpu_timing import (
    DEV,
    DTYPE,
    device_line,
    eager_ms,
    graph_ms,
    measure_ceilings,
    n_sets,
    rel_err,
    today,
)
from vlmdeploy.kernels import reference
from vlmdeploy.kernels.fused_moe_kernel import fused_moe_triton
from vlmdeploy.kernels.kv_quant import KVQuant, bytes_per_head, quantize_kv
from vlmdeploy.kernels.triton_ops import (
    paged_attention_triton,
    qk_norm_rope_triton,
    rms_norm_triton,
    silu_and_mul_triton,
    store_kv_triton,
)

HIDDEN, INTER, N_Q, N_KV, HEAD_DIM, PAGE = 4096, 12288, 32, 8, 128, 64  # InternVL3.5-8B's Qwen3-8B


@dataclasses.dataclass
class Row:
    kernel: str
    case: str
    bytes: float
    flops: float
    ours_ms: float
    ref_ms: float | None = None
    sdpa_ms: float | None = None
    err: float = 0.0
    sdpa_note: str = ""
    cudnn_ms: float | None = None
    cudnn_note: str = ""


# ---------------------------------------------------------------- elementwise kernels


def bench_rms_norm(T: int) -> Row:
    nbytes = 4 * T * HIDDEN * 2 + HIDDEN * 2  # read x, residual; write out, residual
    w = (1 + 0.1 * torch.randn(HIDDEN, device=DEV)).to(DTYPE)
    sets = [
        (
            torch.randn(T, HIDDEN, device=DEV, dtype=DTYPE),
            torch.randn(T, HIDDEN, device=DEV, dtype=DTYPE),
        )
        for _ in range(n_sets(nbytes))
    ]
    ours = graph_ms([lambda x=x, r=r: rms_norm_triton(x, w, 1e-6, r) for x, r in sets])
    ref = graph_ms([lambda x=x, r=r: reference.rms_norm(x, w, 1e-6, r) for x, r in sets])
    x, r = sets[0]
    err = rel_err(rms_norm_triton(x, w, 1e-6, r)[0], reference.rms_norm(x, w, 1e-6, r)[0])
    return Row("rms_norm + residual", f"T={T}, hidden {HIDDEN}", nbytes, 0, ours, ref, err=err)


def bench_silu_and_mul(T: int) -> Row:
    nbytes = 3 * T * INTER * 2
    sets = [torch.randn(T, 2 * INTER, device=DEV, dtype=DTYPE) for _ in range(n_sets(nbytes))]
    ours = graph_ms([lambda x=x: silu_and_mul_triton(x) for x in sets])
    ref = graph_ms([lambda x=x: reference.silu_and_mul(x) for x in sets])
    err = rel_err(silu_and_mul_triton(sets[0]), reference.silu_and_mul(sets[0]))
    return Row("silu_and_mul", f"T={T}, inter {INTER}", nbytes, 0, ours, ref, err=err)


def bench_qk_norm_rope(T: int) -> Row:
    nbytes = T * ((N_Q + N_KV) * HEAD_DIM * 2 * 2 + 2 * HEAD_DIM * 2)  # q, k in and out; cos, sin
    qw = (1 + 0.1 * torch.randn(HEAD_DIM, device=DEV)).to(DTYPE)
    kw = (1 + 0.1 * torch.randn(HEAD_DIM, device=DEV)).to(DTYPE)
    sets = []
    for _ in range(n_sets(nbytes)):
        qkv = torch.randn(T, (N_Q + 2 * N_KV) * HEAD_DIM, device=DEV, dtype=DTYPE)
        q = qkv[:, : N_Q * HEAD_DIM].view(T, N_Q, HEAD_DIM)  # strided views, as in the model
        k = qkv[:, N_Q * HEAD_DIM : (N_Q + N_KV) * HEAD_DIM].view(T, N_KV, HEAD_DIM)
        pos = torch.randint(0, 8192, (T,), device=DEV)
        sets.append((q, k, qw, kw, *reference.rope_cos_sin(pos, HEAD_DIM, 1e6, DTYPE)))
    ours = graph_ms([lambda a=a: qk_norm_rope_triton(*a, 1e-6) for a in sets])
    ref = graph_ms([lambda a=a: reference.qk_norm_rope(*a, 1e-6) for a in sets])
    err = rel_err(qk_norm_rope_triton(*sets[0], 1e-6)[0], reference.qk_norm_rope(*sets[0], 1e-6)[0])
    return Row("qk_norm_rope", f"T={T}, {N_Q}+{N_KV} heads", nbytes, 0, ours, ref, err=err)


def bench_store_kv(T: int) -> Row:
    nbytes = 4 * T * N_KV * HEAD_DIM * 2
    blocks = 2 * triton.cdiv(T, PAGE)
    sets = []
    for _ in range(n_sets(nbytes)):
        kv = torch.randn(T, 2, N_KV, HEAD_DIM, device=DEV, dtype=DTYPE)
        caches = torch.zeros(2, blocks, PAGE, N_KV, HEAD_DIM, device=DEV, dtype=DTYPE)
        slots = torch.randperm(blocks * PAGE, device=DEV)[:T]
        sets.append((kv[:, 0], kv[:, 1], caches[0], caches[1], slots))
    ours = graph_ms([lambda a=a: store_kv_triton(*a) for a in sets])
    ref = eager_ms(lambda: reference.store_kv(*sets[0]))  # boolean indexing syncs: no graph
    k, v, kc, vc, slots = sets[0]
    kc2, vc2 = kc.clone(), vc.clone()
    store_kv_triton(k, v, kc, vc, slots)
    reference.store_kv(k, v, kc2, vc2, slots)
    return Row("store_kv", f"T={T}, page {PAGE}", nbytes, 0, ours, ref, err=rel_err(kc, kc2))


KV_POLICIES = {8: "int8", 4: "int4", 16: "fp8"}


def bench_store_kv_quant(policy: int, T: int) -> Row:
    """T tokens' k and v quantised into their slots: read bf16, write codes and pairs."""
    head = bytes_per_head(policy, HEAD_DIM, DTYPE)
    nbytes = 2 * T * N_KV * (HEAD_DIM * 2 + head)
    blocks = 2 * triton.cdiv(T, PAGE)
    sets = []
    for _ in range(n_sets(nbytes)):
        kv = torch.randn(T, 2, N_KV, HEAD_DIM, device=DEV, dtype=DTYPE)
        codes, sz = quantize_kv(torch.zeros(2, blocks, PAGE, N_KV, HEAD_DIM, device=DEV), policy,
                                DTYPE)
        quant = KVQuant(policy, *((sz[0], sz[1]) if sz is not None else ()))
        slots = torch.randperm(blocks * PAGE, device=DEV)[:T]
        sets.append((kv[:, 0], kv[:, 1], codes[0], codes[1], slots, quant))
    ours = graph_ms([lambda a=a: store_kv_triton(*a) for a in sets])
    ref = eager_ms(lambda: reference.store_kv(*sets[0]))
    return Row(f"store_kv {KV_POLICIES[policy]}", f"T={T}, page {PAGE}", nbytes, 0, ours, ref)


# ---------------------------------------------------------------- mixture of experts

MOE_HIDDEN, MOE_INTER, MOE_EXPERTS, MOE_TOP_K = 2048, 768, 128, 8  # InternVL3.5-30B-A3B's


def bench_fused_moe(T: int) -> Row:
    """One Qwen3-30B-A3B MoE layer: bytes are the weights of the experts the batch routes to
    (read once each) plus the activations; FLOPs the three projections of every (token, choice)
    pair."""
    h, i, e, k = MOE_HIDDEN, MOE_INTER, MOE_EXPERTS, MOE_TOP_K
    w1 = (torch.randn(e, 2 * i, h, device=DEV) * h**-0.5).to(DTYPE)
    w2 = (torch.randn(e, h, i, device=DEV) * i**-0.5).to(DTYPE)
    sets = []
    for _ in range(n_sets(3 * e * h * i * 2 * min(1.0, T * k / e))):
        x = torch.randn(T, h, device=DEV, dtype=DTYPE)
        weights, ids = reference.moe_route(torch.randn(T, e, device=DEV), k, True)
        sets.append((x, weights, ids))
    active = len(set(sets[0][2].flatten().tolist()))
    nbytes = active * 3 * h * i * 2 + 2 * T * h * 2
    flops = 2 * T * k * 3 * h * i
    ours = graph_ms([lambda a=a: fused_moe_triton(a[0], w1, w2, a[1], a[2]) for a in sets])
    x, weights, ids = sets[0]
    ref = eager_ms(lambda: reference.fused_moe(x, w1, w2, weights, ids))  # host-syncs: no graph
    err = rel_err(fused_moe_triton(x, w1, w2, weights, ids),
                  reference.fused_moe(x, w1, w2, weights, ids))
    case = f"T={T}, {e} experts top-{k}, {h}→{i} ({active} active)"
    return Row("fused_moe", case, nbytes, flops, ours, ref, err=err)


GPT_OSS_HIDDEN, GPT_OSS_INTER, GPT_OSS_EXPERTS, GPT_OSS_TOP_K = 2880, 2880, 32, 4  # 20B-A4B's


def bench_fused_moe_gpt_oss(T: int) -> Row:
    """One GPT-OSS-20B MoE layer as the model runs it: the router's top-k softmax, then the
    experts in the checkpoint's layout (``x @ W``, gate/up interleaved) with their biases and
    the clamped SwiGLU. Bytes and FLOPs as :func:`bench_fused_moe`, the biases' bytes added."""
    h, i, e, k = GPT_OSS_HIDDEN, GPT_OSS_INTER, GPT_OSS_EXPERTS, GPT_OSS_TOP_K
    gate_up = (torch.randn(e, h, 2 * i, device=DEV) * h**-0.5).to(DTYPE)
    down = (torch.randn(e, i, h, device=DEV) * i**-0.5).to(DTYPE)
    experts = (gate_up.transpose(1, 2), down.transpose(1, 2))
    opts = dict(gate_up_bias=torch.randn(e, 2 * i, device=DEV).to(DTYPE),
                down_bias=torch.randn(e, h, device=DEV).to(DTYPE), interleaved=True,
                activation=reference.ClampedSwiGLU(alpha=1.702, limit=7.0))
    sets = []
    for _ in range(n_sets(3 * e * h * i * 2 * min(1.0, T * k / e))):
        x = torch.randn(T, h, device=DEV, dtype=DTYPE)
        weights, ids = reference.moe_route(torch.randn(T, e, device=DEV), k, False,
                                           topk_then_softmax=True)
        sets.append((x, weights, ids))
    active = len(set(sets[0][2].flatten().tolist()))
    nbytes = active * (3 * h * i + 2 * i + h) * 2 + 2 * T * h * 2
    flops = 2 * T * k * 3 * h * i
    ours = graph_ms([lambda a=a: fused_moe_triton(a[0], *experts, a[1], a[2], **opts)
                     for a in sets])
    x, weights, ids = sets[0]
    ref = eager_ms(lambda: reference.fused_moe(x, *experts, weights, ids, **opts))
    err = rel_err(fused_moe_triton(x, *experts, weights, ids, **opts),
                  reference.fused_moe(x, *experts, weights, ids, **opts))
    case = f"T={T}, {e} experts top-{k}, {h}→{i} ({active} active)"
    return Row("fused_moe gpt-oss", case, nbytes, flops, ours, ref, err=err)


# ---------------------------------------------------------------- attention


def paged_batch(q_lens: list[int], kv_lens: list[int]) -> dict:
    """Random paged batch: each sequence's blocks scattered over a shuffled cache."""
    n_blocks = [triton.cdiv(kv, PAGE) for kv in kv_lens]
    total = sum(n_blocks)
    order = torch.randperm(total, device=DEV).to(torch.int32)
    tables = torch.full((len(kv_lens), max(n_blocks)), -1, dtype=torch.int32, device=DEV)
    used = 0
    for b, nb in enumerate(n_blocks):
        tables[b, :nb] = order[used : used + nb]
        used += nb
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    return dict(
        q=torch.randn(int(cu[-1]), N_Q, HEAD_DIM, device=DEV, dtype=DTYPE),
        k_cache=torch.randn(total, PAGE, N_KV, HEAD_DIM, device=DEV, dtype=DTYPE),
        v_cache=torch.randn(total, PAGE, N_KV, HEAD_DIM, device=DEV, dtype=DTYPE),
        cu_seqlens_q=cu,
        kv_lens=torch.tensor(kv_lens, dtype=torch.int32, device=DEV),
        block_tables=tables,
        scale=HEAD_DIM**-0.5,
    )


def dense_kv(batch: dict, b: int, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence b's context as contiguous (1, Hkv, kv_len, D) tensors for SDPA."""
    k = reference.gather_kv(batch["k_cache"], batch["block_tables"][b], kv_len)
    v = reference.gather_kv(batch["v_cache"], batch["block_tables"][b], kv_len)
    return k.transpose(0, 1)[None].contiguous(), v.transpose(0, 1)[None].contiguous()


def sdpa_flash_ms(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
) -> tuple[float | None, str]:
    """SDPA restricted to the flash backend; GQA native if it accepts that, else K/V expanded."""
    from torch.nn.attention import SDPBackend

    ms, note = sdpa_backend_ms(q, k, v, causal, SDPBackend.FLASH_ATTENTION, gqa=True)
    if ms is not None:
        return ms, "flash, native GQA"
    group = q.shape[1] // k.shape[1]
    if k.numel() * group * 2 * 2 > (24 << 30):
        return None, "skipped: expanded K/V too large"
    kx, vx = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    ms, note = sdpa_backend_ms(q, kx, vx, causal, SDPBackend.FLASH_ATTENTION, gqa=False)
    return ms, "flash, K/V expanded to 32 heads" if ms is not None else note


def sdpa_backend_ms(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, backend, gqa: bool = True
) -> tuple[float | None, str]:
    """SDPA restricted to one backend: CUDA-graph replays, or eager medians (``do_bench``) where the
    backend cannot be captured; (None, why) where it does not run."""
    from torch.nn.attention import sdpa_kernel

    def call():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    try:
        call()
    except RuntimeError as e:
        return None, f"{backend.name} unavailable ({type(e).__name__})"
    try:
        return graph_ms([call]), ""
    except RuntimeError:
        return eager_ms(call), "eager"


def attention_bytes(q_tokens: int, kv_lens: list[int]) -> float:
    return (2 * q_tokens * N_Q * HEAD_DIM + 2 * sum(kv_lens) * N_KV * HEAD_DIM) * 2


def attention_flops(q_lens: list[int], kv_lens: list[int]) -> float:
    visible = sum(q * (kv - q) + q * (q + 1) // 2 for q, kv in zip(q_lens, kv_lens, strict=True))
    return 4 * HEAD_DIM * N_Q * visible


def bench_decode(B: int, ctx: int) -> Row:
    q_lens, kv_lens = [1] * B, [ctx] * B
    nbytes = attention_bytes(B, kv_lens)
    batches = [paged_batch(q_lens, kv_lens) for _ in range(n_sets(nbytes))]
    call = lambda bt: paged_attention_triton(**bt, max_q_len=1, max_kv_len=ctx)  # noqa: E731
    ours = graph_ms([lambda bt=bt: call(bt) for bt in batches])
    bt = batches[0]
    ref = eager_ms(lambda: reference.paged_attention(**bt))
    err = rel_err(call(bt), reference.paged_attention(**bt))
    # SDPA on the same contexts laid out densely: (B, Hkv, ctx, D)
    ks, vs = zip(*(dense_kv(bt, b, ctx) for b in range(B)), strict=True)
    k, v = torch.cat(ks), torch.cat(vs)
    del ks, vs
    sdpa, note = sdpa_flash_ms(bt["q"].view(B, N_Q, 1, HEAD_DIM), k, v, causal=False)
    row = Row(
        "paged decode",
        f"B={B}, ctx {ctx}",
        nbytes,
        attention_flops(q_lens, kv_lens),
        ours,
        ref,
        sdpa,
        err,
        note,
    )
    del k, v, batches
    return row


def quantized(batch: dict, policy: int) -> dict:
    """``paged_batch``'s caches quantised under ``policy`` (the bf16 ones are dropped)."""
    k, k_sz = quantize_kv(batch.pop("k_cache"), policy, DTYPE)
    v, v_sz = quantize_kv(batch.pop("v_cache"), policy, DTYPE)
    return {**batch, "k_cache": k, "v_cache": v, "kv_quant": KVQuant(policy, k_sz, v_sz)}


def bench_decode_quant(policy: int, B: int, ctx: int) -> Row:
    """Decode attention over a quantised cache: the floor counts its smaller bytes."""
    q_lens, kv_lens = [1] * B, [ctx] * B
    head = bytes_per_head(policy, HEAD_DIM, DTYPE)
    nbytes = 2 * B * N_Q * HEAD_DIM * 2 + 2 * sum(kv_lens) * N_KV * head
    batches = [quantized(paged_batch(q_lens, kv_lens), policy) for _ in range(n_sets(nbytes))]
    call = lambda bt: paged_attention_triton(**bt, max_q_len=1, max_kv_len=ctx)  # noqa: E731
    ours = graph_ms([lambda bt=bt: call(bt) for bt in batches])
    bt = batches[0]
    ref = eager_ms(lambda: reference.paged_attention(**bt))
    err = rel_err(call(bt), reference.paged_attention(**bt))
    return Row(f"paged decode {KV_POLICIES[policy]}", f"B={B}, ctx {ctx}", nbytes,
               attention_flops(q_lens, kv_lens), ours, ref, None, err, "n/a: quantised cache")


def bench_prefill(name: str, q_lens: list[int], kv_lens: list[int], sdpa: bool) -> Row:
    nbytes = attention_bytes(sum(q_lens), kv_lens)
    bt = paged_batch(q_lens, kv_lens)
    lead = next((i for i, n in enumerate(q_lens) if n != 1), len(q_lens))
    call = lambda: paged_attention_triton(  # noqa: E731
        **bt,
        max_q_len=max(q_lens),
        max_kv_len=max(kv_lens),
        num_decode=lead,  # as the engine passes it: leading one-token rows take the decode kernel
    )
    ours = graph_ms([call])
    ref = eager_ms(lambda: reference.paged_attention(**bt))
    err = rel_err(call(), reference.paged_attention(**bt))
    sdpa_ms, note = None, "n/a: SDPA aligns its causal mask top-left"
    cudnn_ms, cudnn_note = None, ""
    if sdpa:  # whole prompts of equal length: SDPA's is_causal is the same mask
        B, T = len(q_lens), q_lens[0]
        ks, vs = zip(*(dense_kv(bt, b, T) for b in range(B)), strict=True)
        q = bt["q"].view(B, T, N_Q, HEAD_DIM).transpose(1, 2).contiguous()
        k, v = torch.cat(ks), torch.cat(vs)
        sdpa_ms, note = sdpa_flash_ms(q, k, v, causal=True)
        from torch.nn.attention import SDPBackend

        cudnn_ms, cudnn_note = sdpa_backend_ms(q, k, v, True, SDPBackend.CUDNN_ATTENTION)
    return Row(
        "paged prefill",
        name,
        nbytes,
        attention_flops(q_lens, kv_lens),
        ours,
        ref,
        sdpa_ms,
        err,
        note,
        cudnn_ms,
        cudnn_note,
    )


# ---------------------------------------------------------------- report


def fmt_us(ms: float | None) -> str:
    return "–" if ms is None else f"{ms * 1e3:,.1f}"


def render(rows: list[Row], bw: float, rate: float) -> str:
    lines = [
        "# Kernel benchmark",
        "",
        f"Device: {device_line()}. Date: {today()}, commit {results.current_commit() or '?'}. "
        "Produced by `python -m benchmarks.kernels`.",
        "",
        f"Ceilings measured in the same run: device copy **{bw / 1e12:.2f} TB/s** (read + write), "
        f"bf16 matmul 8192³ **{rate / 1e12:.0f} TFLOP/s**. Shapes: InternVL3.5-8B language model "
        f"(hidden {HIDDEN}, {N_Q} q heads, {N_KV} kv heads, head_dim {HEAD_DIM}), bf16, "
        f"KV pages of {PAGE} tokens. Times in µs; ours and SDPA are medians of CUDA-graph replays "
        "over rotating inputs, the reference path eager medians (`do_bench`). % roofline = "
        "max(bytes / copy BW, FLOPs / matmul rate) / time. err = ‖ours − ref‖ / ‖ref‖.",
        "",
        "| kernel | case | ours µs | TB/s | TFLOP/s | % roofline | reference µs | × vs ref "
        "| SDPA flash µs | × vs SDPA | SDPA cuDNN µs | × vs cuDNN | err |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        sec = r.ours_ms * 1e-3
        floor = max(r.bytes / bw, r.flops / rate)
        vs_ref = f"{r.ref_ms / r.ours_ms:.1f}" if r.ref_ms else "–"
        vs_sdpa = f"{r.sdpa_ms / r.ours_ms:.2f}" if r.sdpa_ms else "–"
        sdpa = fmt_us(r.sdpa_ms) + (f" ({r.sdpa_note})" if r.sdpa_note else "")
        vs_cudnn = f"{r.cudnn_ms / r.ours_ms:.2f}" if r.cudnn_ms else "–"
        cudnn = fmt_us(r.cudnn_ms) + (f" ({r.cudnn_note})" if r.cudnn_note else "")
        lines.append(
            f"| {r.kernel} | {r.case} | {fmt_us(r.ours_ms)} | {r.bytes / sec / 1e12:.2f} | "
            f"{r.flops / sec / 1e12:.1f} | {100 * floor / sec:.0f}% | {fmt_us(r.ref_ms)} | "
            f"{vs_ref} | {sdpa} | {vs_sdpa} | {cudnn} | {vs_cudnn} | {r.err:.1e} |"
        )
    return "\n".join(lines) + "\n"


def history_rows(rows: list[Row], bw: float, rate: float, st: results.Stamp) -> list[dict]:
    """The run's rows for the results history: each case's time for every provider, our kernel's
    share of its roofline, and the two ceilings that share is measured against."""
    shape = "InternVL3.5-8B"
    add = lambda *a: results.row(st, shape, *a)
    out = [add("device ceiling", "copy_tb_per_s", "device", bw / 1e12, "TB/s", "read + write"),
           add("device ceiling", "bf16_matmul_tflop_per_s", "device", rate / 1e12, "TFLOP/s",
               "8192^3")]
    for r in rows:
        case = f"{r.kernel}: {r.case}"
        floor = max(r.bytes / bw, r.flops / rate)
        model = {"fused_moe": "InternVL3.5-30B-A3B",
                 "fused_moe gpt-oss": "InternVL3.5-GPT-OSS-20B-A4B"}.get(r.kernel, shape)
        add = lambda *a, model=model: results.row(st, model, *a)
        out += [add(case, "time_us", "vlmdeploy", r.ours_ms * 1e3, "us", "Triton"),
                add(case, "roofline_pct", "vlmdeploy", 100 * floor / (r.ours_ms * 1e-3), "%")]
        for system, ms, note in (("torch-reference", r.ref_ms, "eager (do_bench)"),
                                 ("sdpa-flash", r.sdpa_ms, r.sdpa_note),
                                 ("sdpa-cudnn", r.cudnn_ms, r.cudnn_note)):
            if ms is not None:
                out.append(add(case, "time_us", system, ms * 1e3, "us", note))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the markdown table to this file")
    parser.add_argument("--csv", help="append the run's rows to this results CSV")
    parser.add_argument("--quick", action="store_true", help="fewer cases (a smoke run)")
    parser.add_argument("--only", default="", help="only cases whose bench_* name has this")
    args = parser.parse_args()
    torch.manual_seed(0)
    bw, rate = measure_ceilings()
    print(f"ceilings: copy {bw / 1e12:.2f} TB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s", flush=True)
    tokens = [64, 2676] if args.quick else [1, 64, 256, 2676]
    decode = (
        [(1, 512), (64, 2048)]
        if args.quick
        else [(B, ctx) for B in (1, 64, 256) for ctx in (512, 2048, 8192)]
    )
    cases: list[tuple[str, Callable[[], Row]]] = []
    for fn in (bench_rms_norm, bench_silu_and_mul, bench_qk_norm_rope, bench_store_kv):
        cases += [(fn.__name__, lambda fn=fn, T=T: fn(T)) for T in tokens]
    cases += [("bench_decode", lambda B=B, ctx=ctx: bench_decode(B, ctx)) for B, ctx in decode]
    quant_decode = [(1, 8192), (64, 2048)] if args.quick else [(1, 8192), (64, 2048), (256, 2048)]
    for policy in KV_POLICIES:
        cases += [("bench_decode_quant",
                   lambda p=policy, B=B, ctx=ctx: bench_decode_quant(p, B, ctx))
                  for B, ctx in quant_decode]
        cases += [("bench_store_kv_quant", lambda p=policy, T=T: bench_store_kv_quant(p, T))
                  for T in (1, 2676)]
    moe_tokens = [1, 256] if args.quick else [1, 16, 256, 2048]
    cases += [("bench_fused_moe", lambda T=T: bench_fused_moe(T)) for T in moe_tokens]
    cases += [("bench_fused_moe_gpt_oss", lambda T=T: bench_fused_moe_gpt_oss(T))
              for T in moe_tokens]
    prefills = [
        ("1 prompt × 2,676", [2676], [2676], True),
        ("4 prompts × 2,676", [2676] * 4, [2676] * 4, True),
        ("chunk 512 after 2,164 cached", [512], [2676], False),
        ("mixed: 64 decodes @ 2,048 + chunk 512", [1] * 64 + [512], [2048] * 64 + [2676], False),
    ]
    cases += [("bench_prefill", lambda p=p: bench_prefill(*p)) for p in prefills]
    rows = []
    for family, case in cases:
        if args.only not in family:
            continue
        try:
            row = case()
        except Exception:  # report the rest even if one case breaks
            traceback.print_exc()
            continue
        rows.append(row)
        print(
            f"{row.kernel:20s} {row.case:40s} ours {fmt_us(row.ours_ms):>10s} us  "
            f"ref {fmt_us(row.ref_ms):>10s} us  sdpa {fmt_us(row.sdpa_ms):>10s} us  "
            f"cudnn {fmt_us(row.cudnn_ms):>10s} us  "
            f"err {row.err:.1e}",
            flush=True,
        )
        torch.cuda.empty_cache()
    text = render(rows, bw, rate)
    if args.out:
        Path(args.out).write_text(text)
    if args.csv:
        results.append(args.csv, history_rows(rows, bw, rate, results.stamp(device_line())))
    print(text)


if __name__ == "__main__":
    main()
