"""Paged-KV decode attention (one new token per sequence), GQA-aware, with split-K over long
contexts.

Contract: :func:`vlmdeploy.kernels.reference.paged_attention` restricted to batches whose sequences
have at most one new token. One program handles one (sequence, kv head, split): the GROUP query
heads that share the kv head are stacked into the rows of one matrix (padded to 16 rows for the
tensor cores), so each KV block is read from memory once per group rather than once per query head.
Decode is memory-bound, so the padding costs nothing measurable.

When sequences x kv heads would leave the GPU idle (small batches, long contexts), each sequence's
context is cut into num_splits equal chunks processed in parallel; every split writes its partial
output and log-sum-exp, and a second small kernel merges them. The chunk length is derived on the
device from each sequence's own length, so a CUDA graph captured with a generous ``max_kv_len``
still spreads a short context over all splits.

A quantised cache (``kv_quant``: int8, int4, fp8) is dequantised tile by tile in registers; the
fused launch quantises the new token's k and v and attends with their dequantised values, exactly
what a later read of the cache gives.
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
from .device import multiprocessors
from .kv_quant import KVQuant
from .kv_quant_tile import check_cache, dequantize_rows, quant_args, quantize_rows, store_quantized
from .pdl import pdl_args, pdl_enabled, pdl_wait
from .qk_norm_rope_kernel import (
    heads_view,
    norm_rope_rows,
    qk_norm_rope_store_triton,
    rope_out_dtype,
)

_TARGET_WAVES = 2  # programs per multiprocessor to aim for before splitting contexts
_MIN_SPLIT_TOKENS = 128  # shorter chunks cost more in partial writes and merging than they gain
_MAX_SPLITS = 64
FUSE_MIN_SPLITS = 8  # contexts split this many ways take q/k norm, RoPE and store in the launch


# Integer arguments that change from batch to batch are not specialised on (Triton would otherwise
# compile another variant when one turns 1 or a multiple of 16, in the middle of serving).
@triton.jit(do_not_specialize=["num_splits", "stride_bt"])
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, cu_q_ptr, kv_lens_ptr, bt_ptr, out_ptr,
                   part_o_ptr, part_lse_ptr, sinks_ptr, window, qk_scale, n_q_heads, num_splits,
                   stride_qt, stride_qh, stride_kb, stride_ks, stride_kh,
                   stride_vb, stride_vs, stride_vh, stride_bt, stride_ot, stride_oh,
                   k_new_ptr, v_new_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, slot_ptr, eps,
                   stride_knt, stride_knh, stride_vnt, stride_vnh, stride_ct,
                   k_sz_ptr, v_sz_ptr, stride_zb, stride_zs, stride_zh,
                   GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
                   PAGE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
                   PRECISION: tl.constexpr, UPCAST: tl.constexpr, NORM_ROPE: tl.constexpr,
                   ROUND_QW: tl.constexpr, ROUND_KW: tl.constexpr, PDL: tl.constexpr,
                   HAS_SINKS: tl.constexpr, WINDOW: tl.constexpr, QUANT: tl.constexpr,
                   PAD: tl.constexpr):
    pdl_wait(PDL)
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    t = tl.load(cu_q_ptr + b).to(tl.int64)  # the sequence's only query token
    if tl.load(cu_q_ptr + b + 1) == t:
        return
    kv_len = tl.load(kv_lens_ptr + b)
    if WINDOW:  # only the last `window` keys: the splits share those out
        first = tl.maximum(kv_len - window, 0)
        split_len = tl.cdiv(tl.cdiv(kv_len - first, num_splits), BLOCK_N) * BLOCK_N
        lo = first + split * split_len
    else:
        split_len = tl.cdiv(tl.cdiv(kv_len, num_splits), BLOCK_N) * BLOCK_N
        lo = split * split_len
    hi = tl.minimum(lo + split_len, kv_len)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g  # (BLOCK_G,)
    g_mask = (g < GROUP)[:, None]
    bt = bt_ptr + b.to(tl.int64) * stride_bt
    if NORM_ROPE:
        # q, and the new token's k, normalised and rotated here from the raw projections; k and v
        # enter the scores straight from registers, and the cache from the split that holds the
        # new token, after its loop (a store before it would hold the loop's loads back)
        last = kv_len - 1
        slot = tl.load(slot_ptr + t)
        page = tl.load(bt + last // PAGE).to(tl.int64)
        fresh = (slot >= 0) & (slot == page * PAGE + last % PAGE)
        cos_row, sin_row = cos_ptr + t * stride_ct, sin_ptr + t * stride_ct
        q = norm_rope_rows(q_ptr + t * stride_qt + heads[:, None] * stride_qh, d[None, :], g_mask,
                           qw_ptr, cos_row, sin_row, eps, out_ptr.dtype.element_ty, ROUND_QW,
                           HEAD_DIM // 2)  # (BLOCK_G, D)
        row = tl.zeros([1, 1], tl.int64)  # the kv head's single row, as a (1, D) tile
        k_new = norm_rope_rows(k_new_ptr + t * stride_knt + kv_head * stride_knh + row,
                               d[None, :], row == 0, kw_ptr, cos_row, sin_row, eps,
                               out_ptr.dtype.element_ty, ROUND_KW, HEAD_DIM // 2)
        v_new = tl.load(v_new_ptr + t * stride_vnt + kv_head * stride_vnh + row + d[None, :])
        if QUANT:  # the tile takes what the cache will return: the values dequantised
            sz_ty = k_sz_ptr.dtype.element_ty
            kq, ks, kz = quantize_rows(k_new, QUANT, sz_ty, PAD)
            vq, vs, vz = quantize_rows(v_new, QUANT, sz_ty, PAD)
            k_new = dequantize_rows(kq, ks, kz).to(q.dtype)
            v_new = dequantize_rows(vq, vs, vz).to(q.dtype)
        else:
            k_new = k_new.to(k_cache_ptr.dtype.element_ty)
            v_new = v_new.to(v_cache_ptr.dtype.element_ty)
        new_at = tl.where(fresh, last, -1)  # the tile position that takes k_new / v_new
    else:
        q = tl.load(q_ptr + t * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=g_mask,
                    other=0.0)  # (BLOCK_G, D)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_mask = n < hi
        k, v = load_kv_tile(k_cache_ptr, v_cache_ptr, k_sz_ptr, v_sz_ptr, bt, n, n_mask, kv_head,
                            d, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                            stride_zb, stride_zs, stride_zh, PAGE, True, QUANT, HEAD_DIM, q.dtype)
        if NORM_ROPE:
            is_new = (n == new_at)[:, None]
            k = tl.where(is_new, k_new, k)
            v = tl.where(is_new, v_new, v)
        m_i, l_i, acc = attend_tile(q, k, v, n_mask[None, :], m_i, l_i, acc, qk_scale,
                                    PRECISION, True, UPCAST)

    if NORM_ROPE:
        if fresh & (last >= lo) & (last < hi):  # this split holds the new token: cache it
            at = last % PAGE
            if QUANT:
                one = tl.zeros([1], tl.int64)  # the single row, as a (1,) vector
                sz_at = page * stride_zb + at * stride_zs + kv_head * stride_zh + one
                store_quantized(k_cache_ptr + page * stride_kb + at * stride_ks
                                + kv_head * stride_kh + row, k_sz_ptr + sz_at, kq, ks, kz,
                                one == 0, QUANT, HEAD_DIM)
                store_quantized(v_cache_ptr + page * stride_vb + at * stride_vs
                                + kv_head * stride_vh + row, v_sz_ptr + sz_at, vq, vs, vz,
                                one == 0, QUANT, HEAD_DIM)
            else:
                tl.store(k_cache_ptr + page * stride_kb + at * stride_ks + kv_head * stride_kh
                         + row + d[None, :], k_new)
                tl.store(v_cache_ptr + page * stride_vb + at * stride_vs + kv_head * stride_vh
                         + row + d[None, :], v_new)
    if SPLIT:
        # an empty split (short context) leaves l_i = 0: it writes lse = -inf and weighs nothing
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        part = (t * n_q_heads + heads) * num_splits + split  # (BLOCK_G,) rows of (T, Hq, S)
        tl.store(part_lse_ptr + part, m_i + tl.log2(l_safe), mask=g < GROUP)
        tl.store(part_o_ptr + part[:, None] * HEAD_DIM + d[None, :], acc / l_safe[:, None],
                 mask=g_mask)
    else:
        if HAS_SINKS:  # the sink's share of the softmax: a key of logit sink and value zero
            sink = tl.load(sinks_ptr + heads, mask=g < GROUP, other=0.0).to(tl.float32)
            l_i += tl.exp2(sink * LOG2E_C - m_i)
        o = acc / l_i[:, None]
        tl.store(out_ptr + t * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=g_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _merge_splits_kernel(part_o_ptr, part_lse_ptr, cu_q_ptr, out_ptr, sinks_ptr, n_q_heads,
                         num_splits, stride_ot, stride_oh, BLOCK_S: tl.constexpr,
                         HEAD_DIM: tl.constexpr, PDL: tl.constexpr, HAS_SINKS: tl.constexpr):
    pdl_wait(PDL)
    b = tl.program_id(0)
    head = tl.program_id(1)
    t = tl.load(cu_q_ptr + b).to(tl.int64)
    if tl.load(cu_q_ptr + b + 1) == t:
        return
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, HEAD_DIM)
    s_mask = s < num_splits
    part = (t * n_q_heads + head) * num_splits + s  # (BLOCK_S,)
    lse = tl.load(part_lse_ptr + part, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, axis=0)  # split 0 is never empty, so the max is finite
    w = tl.exp2(lse - m)
    o = tl.load(part_o_ptr + part[:, None] * HEAD_DIM + d[None, :], mask=s_mask[:, None],
                other=0.0)  # (BLOCK_S, D)
    total = tl.sum(w, axis=0)
    if HAS_SINKS:
        total += tl.exp2(tl.load(sinks_ptr + head).to(tl.float32) * LOG2E_C - m)
    merged = tl.sum(w[:, None] * o, axis=0) / total
    tl.store(out_ptr + t * stride_ot + head * stride_oh + d, merged.to(out_ptr.dtype.element_ty))


def choose_num_splits(num_programs: int, max_kv_len: int, device: torch.device) -> int:
    """Enough splits to give every multiprocessor _TARGET_WAVES programs, never below 128 tokens
    each.
    """
    target = _TARGET_WAVES * multiprocessors(device)
    if num_programs >= target:
        return 1
    by_work = triton.cdiv(target, num_programs)
    by_len = max(1, triton.cdiv(max_kv_len, _MIN_SPLIT_TOKENS))
    return max(1, min(by_work, by_len, _MAX_SPLITS))


def _tile_config(q: torch.Tensor, fused: bool) -> dict:
    if not q.is_cuda:
        return dict(BLOCK_N=16)  # small tiles make tiny interpreter tests cross tile and page edges
    if fused:
        # a short loop over small tiles per program, unpipelined: a pipelined variant holds
        # registers and shared memory while it waits for the qkv projection (launched early under
        # PDL), and on an H100 its layer took 46 µs against 39 for this one
        # (tools/tuning/decode_attention.py)
        return dict(BLOCK_N=32, num_warps=8, num_stages=1)
    if q.dtype == torch.float32:
        return dict(BLOCK_N=32, num_warps=4, num_stages=2)
    return dict(BLOCK_N=64, num_warps=4, num_stages=3)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, kv_lens: torch.Tensor, block_tables: torch.Tensor,
                     scale: float, max_kv_len: int | None = None, num_splits: int | None = None,
                     out: torch.Tensor | None = None, norm_rope: tuple | None = None,
                     fuse: bool | None = None, sinks: torch.Tensor | None = None,
                     window: int | None = None, kv_quant: KVQuant | None = None) -> torch.Tensor:
    """Attention for batches with q_len <= 1 per sequence; q (T, Hq, D) -> (T, Hq, D).

    ``num_splits`` overrides the split-K heuristic (tests); without it and without ``max_kv_len``
    the longest context is read from the device once. ``out`` (T, Hq, D), if given, is written
    (it may be a view of a larger output).

    With ``norm_rope`` = ``(k, v, q_weight, k_weight, cos, sin, eps, slot_mapping)`` the step's q
    and k are raw projections, normalised, rotated and stored (k and v) as
    :func:`vlmdeploy.kernels.reference.qk_norm_rope_store` would before the attention. When each
    context is cut into at least ``FUSE_MIN_SPLITS`` splits (a few sequences), the decode launch
    does that itself: one launch less on a latency-bound step. With many sequences the kernel runs
    in several waves, each of which would repeat the work, so a separate launch does it first.
    ``fuse`` overrides the choice (tests).

    ``sinks`` (Hq,) and ``window`` are :func:`vlmdeploy.kernels.reference.paged_attention`'s;
    absent, the kernels are compiled without them. A window bounds the context the splits share.
    ``kv_quant`` describes a quantised cache (:mod:`vlmdeploy.kernels.kv_quant`).
    """
    T, n_q, D = q.shape
    n_kv, page = k_cache.shape[2], k_cache.shape[1]
    check_cache(k_cache, kv_quant, D)
    B = kv_lens.shape[0]
    if num_splits is None and T and B:
        if max_kv_len is None:
            max_kv_len = int(kv_lens.max().item())
        if window is not None:
            max_kv_len = min(max_kv_len, window)
        num_splits = choose_num_splits(B * n_kv, max_kv_len, q.device)
    if norm_rope is not None:
        k_new, v_new, qw, kw, cos, sin, eps, slots = norm_rope
        out_dtype = rope_out_dtype(q, qw, cos, sin)
        if fuse is None:
            fuse = (num_splits or 1) >= FUSE_MIN_SPLITS
        if not fuse or rope_out_dtype(k_new, kw, cos, sin) != out_dtype:
            q = qk_norm_rope_store_triton(q, k_new, v_new, qw, kw, cos, sin, eps, k_cache, v_cache,
                                          slots, kv_quant)
            norm_rope = None
    else:
        out_dtype = q.dtype
    if out is None:
        out = torch.empty(T, n_q, D, dtype=out_dtype, device=q.device)
    if T == 0 or B == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    if norm_rope is not None:
        k_new, v_new = heads_view(k_new), heads_view(v_new)
        qw, kw, cos, sin = qw.contiguous(), kw.contiguous(), cos.contiguous(), sin.contiguous()
        fused = dict(NORM_ROPE=True, ROUND_QW=qw.dtype == q.dtype, ROUND_KW=kw.dtype == k_new.dtype)
        extra = (k_new, v_new, qw, kw, cos, sin, slots.contiguous(), eps, k_new.stride(0),
                 k_new.stride(1), v_new.stride(0), v_new.stride(1), cos.stride(0))
    else:
        fused = dict(NORM_ROPE=False, ROUND_QW=False, ROUND_KW=False)
        extra = (q, q, q, q, q, q, q, 0.0, 0, 0, 0, 0, 0)  # unused placeholders
    group = n_q // n_kv
    pdl = pdl_args(pdl_enabled(q.device))
    part_o = part_lse = out  # unused placeholders when nothing is split
    if num_splits > 1:
        part_o = torch.empty(T, n_q, num_splits, D, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(T, n_q, num_splits, dtype=torch.float32, device=q.device)
    options = dict(HAS_SINKS=sinks is not None, WINDOW=window is not None)
    sinks = q if sinks is None else sinks.contiguous()  # a placeholder pointer without sinks
    quant, quant_consts = quant_args(kv_quant, q)
    _decode_kernel[(B, n_kv, num_splits)](
        q, k_cache, v_cache, cu_seqlens_q, kv_lens, block_tables, out, part_o, part_lse,
        sinks, window or 0, scale * LOG2E, n_q, num_splits, q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1), *extra, *quant,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=D, PAGE=page,
        SPLIT=num_splits > 1, PRECISION=dot_precision(out_dtype),
        UPCAST=not q.is_cuda, **fused, **pdl, **options, **quant_consts,
        **_tile_config(q, norm_rope is not None))
    if num_splits > 1:
        _merge_splits_kernel[(B, n_q)](
            part_o, part_lse, cu_seqlens_q, out, sinks, n_q, num_splits, out.stride(0),
            out.stride(1), BLOCK_S=triton.next_power_of_2(num_splits), HEAD_DIM=D,
            num_warps=4, HAS_SINKS=options["HAS_SINKS"], **pdl)
    return out
