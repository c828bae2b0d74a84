"""Building blocks shared by the paged decode and prefill attention kernels.

Tokens of a sequence live in KV blocks ("pages") listed by its row of ``block_tables``; token n sits
in page ``block_tables[b, n // PAGE]`` at offset ``n % PAGE``. A tile of BLOCK_N tokens may span
several pages or part of one, so each token's address is gathered; the head dimension stays
contiguous, so loads are still 16 bytes wide. Scores are kept in base 2 (``qk_scale`` = scale *
log2(e)) so the softmax uses ``exp2``. :func:`load_kv_tile` dequantises a quantised cache's tiles
in registers, by the kernels' ``QUANT`` constexpr.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kv_quant_tile import load_rows

LOG2E = 1.4426950408889634
LOG2E_C = tl.constexpr(LOG2E)  # the same, for use inside kernels (sinks are logits in base e)


@triton.jit
def load_kv_tile(k_cache_ptr, v_cache_ptr, k_sz_ptr, v_sz_ptr, bt_ptr, n, n_mask, kv_head, d,
                 stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                 stride_zb, stride_zs, stride_zh, PAGE: tl.constexpr, MASKED: tl.constexpr,
                 QUANT: tl.constexpr, HEAD_DIM: tl.constexpr, out_ty: tl.constexpr):
    """K and V of tokens n (BLOCK_N,) of one kv head: two (BLOCK_N, D) tiles. An unquantised
    cache (``QUANT`` 0) is read as stored; a quantised one is dequantised to ``out_ty`` with each
    token's scale and zero point (``*_sz_ptr``, one layout for k and v)."""
    if MASKED:
        page = tl.load(bt_ptr + n // PAGE, mask=n_mask, other=0).to(tl.int64)
    else:
        page = tl.load(bt_ptr + n // PAGE).to(tl.int64)
    slot = n % PAGE
    k_off = page * stride_kb + slot * stride_ks + kv_head * stride_kh  # (BLOCK_N,)
    v_off = page * stride_vb + slot * stride_vs + kv_head * stride_vh
    if QUANT:
        sz_off = page * stride_zb + slot * stride_zs + kv_head * stride_zh
        k = load_rows(k_cache_ptr, k_sz_ptr, k_off, sz_off, d, n_mask, QUANT, HEAD_DIM, MASKED,
                      out_ty)
        v = load_rows(v_cache_ptr, v_sz_ptr, v_off, sz_off, d, n_mask, QUANT, HEAD_DIM, MASKED,
                      out_ty)
    elif MASKED:
        k = tl.load(k_cache_ptr + k_off[:, None] + d[None, :], mask=n_mask[:, None], other=0.0)
        v = tl.load(v_cache_ptr + v_off[:, None] + d[None, :], mask=n_mask[:, None], other=0.0)
    else:
        k = tl.load(k_cache_ptr + k_off[:, None] + d[None, :])
        v = tl.load(v_cache_ptr + v_off[:, None] + d[None, :])
    return k, v


@triton.jit
def mma(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation; UPCAST computes it from fp32 copies of the (already rounded)
    operands, for Triton's interpreter, which multiplies bf16 bit patterns as integers.
    """
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def attend_tile(q, k, v, s_mask, m_i, l_i, acc, qk_scale,
                PRECISION: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr):
    """One online-softmax step of queries q (M, D) over keys/values k, v (N, D).

    Every row must see at least one key in its first tile (true for causal attention: key 0 is
    visible to all), so the running max is finite from then on and fully masked later tiles
    contribute exactly zero.
    """
    s = mma(q, tl.trans(k.to(q.dtype)), PRECISION, UPCAST) * qk_scale  # (M, N) fp32
    if MASKED:
        s = tl.where(s_mask, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    # probabilities in the activations' dtype for the tensor cores, accumulated in fp32
    acc = acc * alpha[:, None] + mma(p.to(q.dtype), v.to(q.dtype), PRECISION, UPCAST)
    return m_new, l_i, acc


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products (the reference's); 16-bit inputs ignore this."""
    return "ieee" if dtype == torch.float32 else "tf32"

