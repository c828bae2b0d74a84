"""Fused mixture-of-experts MLP: tokens grouped by expert, two block-aligned grouped GEMMs, and a
weighted combine. Same contract as :func:`vlmdeploy.kernels.reference.fused_moe`.

1. **Align** (:func:`moe_align`, no host sync, so CUDA graphs capture it): the T·k (token,
   choice) pairs are grouped by expert, and each expert's run is padded up to a multiple of
   ``BLOCK_M``; every block of ``BLOCK_M`` grouped pairs then belongs to one expert
   (``block_expert``). Blocks past the used length get expert ``E`` and exit at once. A decode
   batch's few pairs are aligned by one Triton program, larger batches by sorting (torch ops).
2. **gate-up + activation**: a program takes one block of pairs and ``BLOCK_N`` columns of the
   expert's intermediate width, accumulates the gate and the up tiles of ``x[token]`` over H side
   by side, and writes the activation of its pairs: (T·k, I).
3. **down**: the same grouped GEMM over that activation with the expert's down weight: (T·k, H).
4. **combine**: each token's k outputs summed with its routing weights, in fp32, one launch.

The experts' variants are compile-time switches of the GEMM, so each model compiles only its own
path (Qwen3-MoE's: none of them): ``HAS_BIAS`` (a per-expert bias added after each projection),
``INTERLEAVED`` (gate j and up j are columns 2j and 2j + 1, GPT-OSS's layout; otherwise the
gate's I columns, then the up's) and ``CLAMPED_SWIGLU`` (GPT-OSS's activation, its ``alpha`` and
``limit`` as constants; otherwise SiLU-and-mul). The weights are read through their strides, so
a checkpoint's orientation (``x @ W`` or ``x @ W.T``) needs no copy.

A block reads only its own expert's weights, and only experts that have pairs get blocks, so a
decode step of one token reads ``k`` experts of E (the grid's other programs exit on their first
load). Rounding follows the reference: each projection, bias add and activation step is rounded
to x's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_tile import dot_precision, mma
from .reference import ClampedSwiGLU

# Up to this many (token, choice) pairs (decode batches) one program aligns them all in one launch;
# the torch ops below would be some twenty launches, a cost a decode step pays once per layer.
SMALL_ALIGN_PAIRS = 256


@triton.jit
def _moe_align_small_kernel(ids_ptr, sorted_pairs_ptr, block_expert_ptr, num_pairs, num_experts,
                            num_slots, num_blocks, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
                            BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr):
    """:func:`moe_align` in one program, for at most BLOCK_P pairs: the same output, by
    counting instead of sorting (a pair's place in its expert's run is the number of earlier
    pairs of that expert)."""
    p = tl.arange(0, BLOCK_P)
    p_mask = p < num_pairs
    e_of = tl.load(ids_ptr + p, mask=p_mask, other=num_experts)  # (P,) E: no pair
    cols = tl.arange(0, BLOCK_E)
    onehot = (e_of[:, None] == cols[None, :]) & (cols < num_experts)[None, :]  # (P, E)
    counts = tl.sum(onehot.to(tl.int32), axis=0)  # (E,)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    earlier = (e_of[:, None] == e_of[None, :]) & (p[None, :] < p[:, None])  # (P, P)
    rank = tl.sum(earlier.to(tl.int32), axis=1)
    pos = tl.sum(tl.where(onehot, starts[None, :], 0), axis=1) + rank  # (P,)
    for s0 in range(0, num_slots, BLOCK_S):  # every slot starts as padding
        slots = s0 + tl.arange(0, BLOCK_S)
        tl.store(sorted_pairs_ptr + slots, tl.full([BLOCK_S], 0, tl.int32) + num_pairs,
                 mask=slots < num_slots)
    tl.debug_barrier()  # the padding is written before the pairs land on it
    tl.store(sorted_pairs_ptr + pos, p, mask=p_mask)
    valid_e = (cols < num_experts)[None, :]
    for b0 in range(0, num_blocks, BLOCK_S):  # a block's expert: the runs ended by its start
        b = b0 + tl.arange(0, BLOCK_S)
        done = (ends[None, :] <= (b * BLOCK_M)[:, None]) & valid_e  # (S, E)
        tl.store(block_expert_ptr + b, tl.sum(done.to(tl.int32), axis=1), mask=b < num_blocks)


def moe_align(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (token, choice) pairs of ``topk_ids`` (T, k) grouped by expert in blocks of
    ``block_m``: ``(sorted_pairs (num_blocks · block_m,) int32, block_expert (num_blocks,)
    int32)``. ``sorted_pairs`` holds flat pair indices ``t·k + j``, each expert's run padded with
    ``T·k`` (no pair); ``block_expert[b]`` is the expert of block ``b``, ``num_experts`` for the
    blocks past the last run. Sized from shapes alone: at most ``min(T·k, E)`` runs, each padded
    by fewer than ``block_m``. Up to :data:`SMALL_ALIGN_PAIRS` pairs on one Triton program,
    beyond by sorting (torch ops); both give the same output."""
    n = topk_ids.numel()
    num_blocks = triton.cdiv(n + min(n, num_experts) * (block_m - 1), block_m)
    if 0 < n <= SMALL_ALIGN_PAIRS:
        return _moe_align_small(topk_ids, num_experts, block_m, num_blocks)
    return _moe_align_sorted(topk_ids, num_experts, block_m, num_blocks)


def _moe_align_sorted(topk_ids: torch.Tensor, num_experts: int, block_m: int,
                      num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    flat = topk_ids.reshape(-1).long()  # (N,)
    n = flat.numel()
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # (E,); bincount would read its max
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)  # (E,) end of each expert's padded run
    first = counts.cumsum(0) - counts  # each expert's first index among the sorted pairs
    order = torch.argsort(flat, stable=True)  # (N,) pairs by expert, in token order within one
    sorted_e = flat[order]
    rank = torch.arange(n, device=flat.device) - first[sorted_e]  # place within its expert's run
    sorted_pairs = torch.full((num_blocks * block_m,), n, dtype=torch.int32, device=flat.device)
    sorted_pairs[ends[sorted_e] - padded[sorted_e] + rank] = order.to(torch.int32)
    starts = torch.arange(num_blocks, device=flat.device) * block_m
    block_expert = torch.searchsorted(ends, starts, right=True).to(torch.int32)  # E: past the end
    return sorted_pairs, block_expert


def _moe_align_small(topk_ids: torch.Tensor, num_experts: int, block_m: int,
                     num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = topk_ids.numel()
    if n > SMALL_ALIGN_PAIRS:  # its (P, P) rank tile grows quadratically
        raise ValueError(f"the one-program align takes at most {SMALL_ALIGN_PAIRS} pairs, not {n}")
    device = topk_ids.device
    sorted_pairs = torch.empty(num_blocks * block_m, dtype=torch.int32, device=device)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=device)
    ids = topk_ids.reshape(-1).to(torch.int32)
    _moe_align_small_kernel[(1,)](
        ids, sorted_pairs, block_expert, n, num_experts, sorted_pairs.numel(), num_blocks,
        BLOCK_M=block_m, BLOCK_P=max(16, triton.next_power_of_2(n)),
        BLOCK_E=max(16, triton.next_power_of_2(num_experts)), BLOCK_S=128, num_warps=8)
    return sorted_pairs, block_expert


@triton.jit
def _moe_gemm_kernel(a_ptr, w_ptr, bias_ptr, out_ptr, sorted_pairs_ptr, block_expert_ptr,
                     num_pairs, num_experts, N, K, a_rows_per_pair,
                     stride_am, stride_we, stride_wn, stride_wk, stride_be, stride_om,
                     SWIGLU: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr,
                     CLAMPED_SWIGLU: tl.constexpr, ALPHA: tl.constexpr, LIMIT: tl.constexpr,
                     PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[pair, n] = (a[pair // a_rows_per_pair] @ w[e].T)[n] (+ bias[e, n]) for the pairs of
    one block, all of expert e; w[e] is (N, K), or (2N, K) with SWIGLU, read through its strides.
    With SWIGLU the rows hold gate and up (INTERLEAVED: gate j and up j are rows 2j and 2j + 1;
    else gate rows [0, N), then up rows [N, 2N)), and out is their activation."""
    pid_m = tl.program_id(0)
    e = tl.load(block_expert_ptr + pid_m)
    if e >= num_experts:  # past the last expert's run
        return
    pairs = tl.load(sorted_pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # (BLOCK_M,)
    m_mask = pairs < num_pairs
    a_rows = a_ptr + (pairs // a_rows_per_pair).to(tl.int64)[:, None] * stride_am
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    w = w_ptr + e.to(tl.int64) * stride_we
    if INTERLEAVED:  # one tile of the 2·BLOCK_N rows of this program's gate/up pairs
        acc, acc_up = _gemm_interleaved(a_rows, w, m_mask, N, K, stride_wn, stride_wk,
                                        PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
        col, up_step = 2 * rn, 1  # gate j's column in the bias, and up j's after it
    else:
        col, up_step = rn, N
        w_cols = w + rn.to(tl.int64)[None, :] * stride_wn  # (1, BLOCK_N): W[e] read transposed
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            k_mask = kk < K
            a = tl.load(a_rows + kk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w_mask = k_mask[:, None] & n_mask[None, :]
            w_k = w_cols + kk[:, None] * stride_wk
            wt = tl.load(w_k, mask=w_mask, other=0.0)  # (BLOCK_K, BLOCK_N)
            acc += mma(a, wt, PRECISION, UPCAST)
            if SWIGLU:
                wt_up = tl.load(w_k + N * stride_wn, mask=w_mask, other=0.0)
                acc_up += mma(a, wt_up, PRECISION, UPCAST)
    dtype = out_ptr.dtype.element_ty
    y = acc.to(dtype)
    if HAS_BIAS:  # added to the rounded projection, as a separate add would be
        bias = bias_ptr + e.to(tl.int64) * stride_be + col
        y = (y.to(tl.float32) + tl.load(bias, mask=n_mask).to(tl.float32)).to(dtype)
    if SWIGLU:  # rounded as the reference's activation of the rounded projections
        up = acc_up.to(dtype)
        if HAS_BIAS:
            up_bias = tl.load(bias + up_step, mask=n_mask).to(tl.float32)
            up = (up.to(tl.float32) + up_bias).to(dtype)
        if CLAMPED_SWIGLU:
            y = _clamped_swiglu(y, up, ALPHA, LIMIT)
        else:
            gate = y.to(tl.float32)
            act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
            y = (act * up.to(tl.float32)).to(dtype)
    out = out_ptr + pairs.to(tl.int64)[:, None] * stride_om + rn[None, :]
    tl.store(out, y, mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _gemm_interleaved(a_rows, w, m_mask, N, K, stride_wn, stride_wk,
                      PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The gate and up accumulators, (BLOCK_M, BLOCK_N) each, of this program's BLOCK_N
    intermediates, whose rows of W[e] interleave (gate j: row 2j, up j: row 2j + 1): one
    contiguous tile of 2·BLOCK_N rows and one product per step, split into gate and up once at
    the end (two stride-2 tiles would halve every load's width)."""
    r2 = 2 * (tl.program_id(1) * BLOCK_N) + tl.arange(0, 2 * BLOCK_N)
    w_cols = w + r2.to(tl.int64)[None, :] * stride_wn  # (1, 2·BLOCK_N)
    r2_mask = r2 < 2 * N
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, 2 * BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_mask = kk < K
        a = tl.load(a_rows + kk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        wt = tl.load(w_cols + kk[:, None] * stride_wk, mask=k_mask[:, None] & r2_mask[None, :],
                     other=0.0)  # (BLOCK_K, 2·BLOCK_N)
        acc += mma(a, wt, PRECISION, UPCAST)
    return tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))  # (gate, up)


@triton.jit
def _clamped_swiglu(gate, up, ALPHA: tl.constexpr, LIMIT: tl.constexpr):
    """GPT-OSS's activation of rounded gate and up tiles, each op rounded to their dtype as the
    reference's torch ops round it: ``(up + 1) · (gate · σ(gate · alpha))`` after the clamps."""
    dtype = gate.dtype
    g = tl.minimum(gate.to(tl.float32), LIMIT)  # clamps of representable values: exact
    u = tl.minimum(tl.maximum(up.to(tl.float32), -LIMIT), LIMIT)
    z = (g * ALPHA).to(dtype).to(tl.float32)
    sig = (1.0 / (1.0 + tl.exp(-z))).to(dtype).to(tl.float32)
    glu = (g * sig).to(dtype).to(tl.float32)
    return ((u + 1.0).to(dtype).to(tl.float32) * glu).to(dtype)


@triton.jit
def _moe_combine_kernel(y_ptr, w_ptr, out_ptr, N, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
    """out[t] = Σ_j w[t, j] · y[t·k + j], in fp32, rounded once."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    acc = tl.zeros([BLOCK], tl.float32)
    for j in tl.static_range(TOP_K):
        w = tl.load(w_ptr + t * TOP_K + j).to(tl.float32)
        acc += w * tl.load(y_ptr + (t * TOP_K + j) * N + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * N + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _combine(y: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """(T·k, H) expert outputs and (T, k) routing weights → (T, H)."""
    t, top_k = topk_weights.shape
    n = y.shape[1]
    out = torch.empty(t, n, dtype=y.dtype, device=y.device)
    w = topk_weights.contiguous()
    block = min(1024, triton.next_power_of_2(n))
    _moe_combine_kernel[(t, triton.cdiv(n, block))](y, w, out, n, TOP_K=top_k, BLOCK=block,
                                                    num_warps=4)
    return out


def _grouped_gemm(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                  sorted_pairs: torch.Tensor, block_expert: torch.Tensor, num_pairs: int,
                  a_rows_per_pair: int, n: int, block_m: int, block_n: int, block_k: int,
                  swiglu: bool = False, interleaved: bool = False,
                  activation: ClampedSwiGLU | None = None) -> torch.Tensor:
    if interleaved and not swiglu:
        raise ValueError("interleaved rows hold gate/up pairs: only the SwiGLU GEMM has them")
    out = torch.empty(num_pairs, n, dtype=a.dtype, device=a.device)
    k = w.shape[-1]
    grid = (block_expert.numel(), triton.cdiv(n, block_n))
    clamped = activation is not None
    _moe_gemm_kernel[grid](
        a, w, bias, out, sorted_pairs, block_expert, num_pairs, w.shape[0], n, k, a_rows_per_pair,
        a.stride(0), w.stride(0), w.stride(1), w.stride(2),
        0 if bias is None else bias.stride(0), out.stride(0),
        SWIGLU=swiglu, INTERLEAVED=interleaved, HAS_BIAS=bias is not None,
        CLAMPED_SWIGLU=clamped, ALPHA=activation.alpha if clamped else 0.0,
        LIMIT=activation.limit if clamped else 0.0,
        PRECISION=dot_precision(a.dtype), UPCAST=not a.is_cuda,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=min(block_k, max(16, triton.next_power_of_2(k))),
        num_warps=4, num_stages=3)
    return out


def choose_block_m(num_pairs: int, num_experts: int) -> int:
    """Pairs per block: 16 (the smallest ``tl.dot`` tile) while experts get a pair or two each
    (decode), larger once they get many (prefill)."""
    per_expert = num_pairs / num_experts
    return 16 if per_expert <= 16 else 32 if per_expert <= 64 else 64


def fused_moe_triton(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    interleaved: bool = False,
    activation: ClampedSwiGLU | None = None,
    *,
    block_m: int | None = None,
) -> torch.Tensor:
    """Triton twin of :func:`vlmdeploy.kernels.reference.fused_moe`: x (T, H), w_gate_up
    (E, 2I, H), w_down (E, H, I) (any strides: transposed views of ``x @ W`` weights too),
    biases (E, 2I) and (E, H), topk_weights / topk_ids (T, k) → (T, H)."""
    t, top_k = topk_ids.shape
    num_experts, two_i, _ = w_gate_up.shape
    inter = two_i // 2
    if t == 0:
        return x.new_empty(0, w_down.shape[1])
    x = x if x.stride(-1) == 1 else x.contiguous()
    for bias in (gate_up_bias, down_bias):
        if bias is not None and bias.stride(-1) != 1:
            raise ValueError("the expert biases must be contiguous along their last dim")
    num_pairs = t * top_k
    block_m = block_m or choose_block_m(num_pairs, num_experts)
    sorted_pairs, block_expert = moe_align(topk_ids, num_experts, block_m)
    h = _grouped_gemm(x, w_gate_up, gate_up_bias, sorted_pairs, block_expert, num_pairs, top_k,
                      inter, block_m, 64, 64, swiglu=True, interleaved=interleaved,
                      activation=activation)  # (T·k, I)
    y = _grouped_gemm(h, w_down, down_bias, sorted_pairs, block_expert, num_pairs, 1,
                      w_down.shape[1], block_m, 64, 64)  # (T·k, H)
    return _combine(y, topk_weights)  # (T, H)
