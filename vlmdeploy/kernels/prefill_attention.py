"""Varlen causal attention of packed new tokens over each sequence's paged context (prefill, chunked
prefill, and mixed prefill + decode batches).

Contract: :func:`vlmdeploy.kernels.reference.paged_attention`. The new tokens of a sequence are the
last q_len positions of its context and their keys are already in the cache (``store_kv`` runs
first), so a whole prompt, a later chunk of it and a decode step are one case. One program handles
BLOCK_M rows of one (sequence, kv head), where row r is query r // GROUP of query head r % GROUP:
the GROUP heads that share a kv head share every K/V tile (one read per group), and a decode
sequence in a mixed batch fills GROUP rows instead of wasting a whole tile. KV tiles entirely below
the causal diagonal of every row of a program skip the mask; the rest apply it. A quantised cache
(``kv_quant``) is dequantised tile by tile in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_tile import (
    LOG2E,
    LOG2E_C,
    attend_tile,
    dot_precision,
    load_kv_tile,
)
from .kv_quant import KVQuant
from .kv_quant_tile import check_cache, quant_args


# The block-table width and the first sequence change from batch to batch: not specialised on
@triton.jit(do_not_specialize=["stride_bt", "seq_offset"])
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, cu_q_ptr, kv_lens_ptr, bt_ptr, out_ptr,
                    sinks_ptr, window, qk_scale, seq_offset, stride_qt, stride_qh, stride_kb,
                    stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt, stride_ot,
                    stride_oh, k_sz_ptr, v_sz_ptr, stride_zb, stride_zs, stride_zh,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                    UPCAST: tl.constexpr, HAS_SINKS: tl.constexpr, WINDOW: tl.constexpr,
                    QUANT: tl.constexpr, PAD: tl.constexpr):
    # the heaviest causal tiles (last rows) are launched first so the tail of the grid is short
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    b = tl.program_id(1) + seq_offset
    kv_head = tl.program_id(2)
    q_start = tl.load(cu_q_ptr + b)
    q_len = tl.load(cu_q_ptr + b + 1) - q_start
    row0 = pid_m * BLOCK_M
    if row0 >= q_len * GROUP:
        return
    kv_len = tl.load(kv_lens_ptr + b)
    ctx_start = kv_len - q_len  # position of the first new token

    r = row0 + tl.arange(0, BLOCK_M)
    qi = r // GROUP  # (BLOCK_M,) query index within the sequence
    heads = kv_head * GROUP + r % GROUP
    r_mask = (qi < q_len)[:, None]
    d = tl.arange(0, HEAD_DIM)
    rows = (q_start + qi).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=r_mask, other=0.0)  # (BLOCK_M, D)
    q_pos = ctx_start + qi  # padding rows get positions >= kv_len and stay finite

    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    bt = bt_ptr + b.to(tl.int64) * stride_bt
    first_q = row0 // GROUP
    last_q = tl.minimum((row0 + BLOCK_M - 1) // GROUP, q_len - 1)
    hi = ctx_start + last_q + 1  # keys at or above: visible to no row
    if WINDOW:
        # Each row sees its last `window` keys, so a tile may hide every key from some rows: a
        # finite running max keeps such a tile's contribution at exactly zero (no inf - inf).
        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
        lo = tl.maximum(ctx_start + first_q - window + 1, 0) // BLOCK_N * BLOCK_N
        full_end = lo  # no tile is visible to every row: all are masked below
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        lo = 0
        full_end = (ctx_start + first_q + 1) // BLOCK_N * BLOCK_N  # keys below: seen by all rows
    for start in range(lo, full_end, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        k, v = load_kv_tile(k_cache_ptr, v_cache_ptr, k_sz_ptr, v_sz_ptr, bt, n, n, kv_head, d,
                            stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                            stride_zb, stride_zs, stride_zh, PAGE, False, QUANT, HEAD_DIM, q.dtype)
        m_i, l_i, acc = attend_tile(q, k, v, n, m_i, l_i, acc, qk_scale, PRECISION, False,
                                    UPCAST)
    for start in range(full_end, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_mask = n < hi
        k, v = load_kv_tile(k_cache_ptr, v_cache_ptr, k_sz_ptr, v_sz_ptr, bt, n, n_mask, kv_head,
                            d, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                            stride_zb, stride_zs, stride_zh, PAGE, True, QUANT, HEAD_DIM, q.dtype)
        causal = (n[None, :] <= q_pos[:, None]) & n_mask[None, :]
        if WINDOW:
            causal &= n[None, :] > q_pos[:, None] - window
        m_i, l_i, acc = attend_tile(q, k, v, causal, m_i, l_i, acc, qk_scale, PRECISION, True,
                                    UPCAST)

    if HAS_SINKS:  # the sink's share of the softmax: a key of logit sink and value zero
        l_i += tl.exp2(tl.load(sinks_ptr + heads).to(tl.float32) * LOG2E_C - m_i)
    o = acc / l_i[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=r_mask)


def _tile_config(q: torch.Tensor) -> dict:
    D = q.shape[-1]
    if not q.is_cuda:
        return dict(BLOCK_M=32, BLOCK_N=16)  # small tiles: tiny interpreter tests cross tile edges
    if q.dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    if D >= 128:  # best of a sweep on H100 at the 8B shape (2,676-token prompts)
        return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=2)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      cu_seqlens_q: torch.Tensor, kv_lens: torch.Tensor, block_tables: torch.Tensor,
                      scale: float, max_q_len: int | None = None,
                      out: torch.Tensor | None = None, seq_offset: int = 0,
                      sinks: torch.Tensor | None = None, window: int | None = None,
                      kv_quant: KVQuant | None = None) -> torch.Tensor:
    """Causal attention of packed queries q (T, Hq, D) over their paged contexts -> (T, Hq, D).

    Without ``max_q_len`` the longest new-token run is read from the device once. Only sequences
    ``seq_offset`` and up are computed, and only their rows of the output written (into ``out``
    (T, Hq, D) if given): the rows before belong to another kernel (a mixed batch's decode rows).
    An offset rather than sliced metadata keeps every pointer as aligned as its tensor, so the
    kernel is compiled once, not once per alignment the slices happen to have.

    ``sinks`` (Hq,) and ``window`` are :func:`vlmdeploy.kernels.reference.paged_attention`'s;
    absent, the kernel is compiled without them. ``kv_quant`` describes a quantised cache.
    """
    T, n_q, D = q.shape
    n_kv, page = k_cache.shape[2], k_cache.shape[1]
    check_cache(k_cache, kv_quant, D)
    B = kv_lens.shape[0]
    if out is None:
        out = torch.empty(T, n_q, D, dtype=q.dtype, device=q.device)
    if T == 0 or B <= seq_offset:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    if max_q_len is None:
        max_q_len = int((cu_seqlens_q[seq_offset + 1:] - cu_seqlens_q[seq_offset:-1]).max().item())
    group = n_q // n_kv
    cfg = _tile_config(q)
    grid = (triton.cdiv(max_q_len * group, cfg["BLOCK_M"]), B - seq_offset, n_kv)
    options = dict(HAS_SINKS=sinks is not None, WINDOW=window is not None)
    sinks = q if sinks is None else sinks.contiguous()  # a placeholder pointer without sinks
    quant, quant_consts = quant_args(kv_quant, q)
    _prefill_kernel[grid](
        q, k_cache, v_cache, cu_seqlens_q, kv_lens, block_tables, out, sinks, window or 0,
        scale * LOG2E, seq_offset,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1), *quant,
        GROUP=group, HEAD_DIM=D, PAGE=page, PRECISION=dot_precision(q.dtype),
        UPCAST=not q.is_cuda, **options, **quant_consts, **cfg)
    return out
