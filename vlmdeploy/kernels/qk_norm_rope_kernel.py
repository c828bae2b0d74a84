"""Per-head RMSNorm of q and k followed by NeoX (rotate-half) RoPE, in one launch.

Same contract as :func:`vlmdeploy.kernels.reference.qk_norm_rope`: q (T, Hq, D) and k (T, Hkv, D),
weights (D,), cos/sin (T, D). One program normalises and rotates every head of one token of q or of
k, so each output is written once (each input element is read twice, beside its rotary partner).
q and k may be strided views (e.g. slices of a fused qkv projection) as long as the head dimension
is contiguous; the outputs are new contiguous tensors. The reference's roundings (normalised head in
the input dtype, product with the weight, each RoPE term and their sum) are written out; on an H100
the compiled RoPE step differs by one bf16 step in about a fifth of the elements (relative error
2e-3; likely a product contracted into the following add). :func:`norm_rope_rows` is the same
computation in registers, which the decode attention kernel uses too. Into a quantised cache
(``kv_quant``) the rotated k (in the activations' dtype, as the reference returns it) and v are
quantised by the same program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kv_quant import KVQuant, is_quantized
from .kv_quant_tile import check_cache, quant_args, store_rows
from .pdl import pdl_args, pdl_enabled, pdl_wait


@triton.jit
def norm_rope_rows(row_ptr, d, mask, w_ptr, cos_ptr, sin_ptr, eps, out_ty: tl.constexpr,
                   ROUND_W: tl.constexpr, HALF: tl.constexpr):
    """Heads normalised and rotated, in registers: ``row_ptr`` (R, 1) points at each head's first
    element, ``d`` is ``arange(0, 2 * HALF)[None, :]``, ``cos_ptr``/``sin_ptr`` at the token's
    table rows. Returns (R, 2 * HALF) in ``out_ty``. Each element's rotary partner (the other half)
    is loaded beside it, so every output element is one expression of the reference's roundings.
    """
    partner = (d + HALF) % (2 * HALF)
    x = tl.load(row_ptr + d, mask=mask, other=0.0)
    xp = tl.load(row_ptr + partner, mask=mask, other=0.0)
    xf, xpf = x.to(tl.float32), xp.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / (2 * HALF) + eps)[:, None]
    y = (xf * rstd).to(x.dtype).to(tl.float32) * tl.load(w_ptr + d).to(tl.float32)
    yp = (xpf * rstd).to(x.dtype).to(tl.float32) * tl.load(w_ptr + partner).to(tl.float32)
    if ROUND_W:  # weight in the activations' dtype: the reference rounds the product to it
        y = y.to(x.dtype).to(tl.float32)
        yp = yp.to(x.dtype).to(tl.float32)
    # rotate_half(y) = (-y2, y1); each product and the sum rounded like the reference's tensor ops
    rot = tl.where(d < HALF, -yp, yp)
    c = tl.load(cos_ptr + d).to(tl.float32)
    s = tl.load(sin_ptr + d).to(tl.float32)
    return ((y * c).to(out_ty).to(tl.float32) + (rot * s).to(out_ty).to(tl.float32)).to(out_ty)


@triton.jit
def _norm_rope_heads(x_ptr, w_ptr, cos_ptr, sin_ptr, dst_ptr, stride_dh, t, stride_xt, stride_xh,
                     stride_ct, n_heads, eps, ROUND_W: tl.constexpr, HALF: tl.constexpr,
                     BLOCK_H: tl.constexpr):
    """Normalise and rotate the n_heads heads of token t into ``dst_ptr`` (head h at
    ``h * stride_dh``)."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, 2 * HALF)[None, :]
    mask = heads < n_heads
    out_ty = dst_ptr.dtype.element_ty
    o = norm_rope_rows(x_ptr + t * stride_xt + heads * stride_xh, d, mask, w_ptr,
                       cos_ptr + t * stride_ct, sin_ptr + t * stride_ct, eps, out_ty, ROUND_W,
                       HALF)
    tl.store(dst_ptr + heads * stride_dh + d, o, mask=mask)


@triton.jit
def _store_heads_quantized(k_ptr, v_ptr, kw_ptr, cos_ptr, sin_ptr, k_out_ptr, k_dst, v_dst,
                           k_sz_ptr, v_sz_ptr, sz_slot, t, stride_kt, stride_kh, stride_vt,
                           stride_vh, stride_ct, stride_kch, stride_vch, stride_zh, n_kv_heads, eps,
                           ROUND_KW: tl.constexpr, HALF: tl.constexpr, BLOCK_HK: tl.constexpr,
                           QUANT: tl.constexpr, PAD: tl.constexpr):
    """Token t's k heads normalised and rotated in k_out's dtype (the reference's k), then it and
    v quantised into the slot at ``k_dst``/``v_dst`` (scales and zeros at ``sz_slot``)."""
    heads = tl.arange(0, BLOCK_HK)
    h = heads[:, None]
    d = tl.arange(0, 2 * HALF)[None, :]
    k = norm_rope_rows(k_ptr + t * stride_kt + h * stride_kh, d, h < n_kv_heads, kw_ptr,
                       cos_ptr + t * stride_ct, sin_ptr + t * stride_ct, eps,
                       k_out_ptr.dtype.element_ty, ROUND_KW, HALF)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=h < n_kv_heads, other=0.0)
    sz = sz_slot + heads * stride_zh  # (BLOCK_HK,)
    store_rows(k, k_dst + h * stride_kch, k_sz_ptr + sz, heads < n_kv_heads, QUANT, PAD, 2 * HALF)
    store_rows(v, v_dst + h * stride_vch, v_sz_ptr + sz, heads < n_kv_heads, QUANT, PAD, 2 * HALF)


@triton.jit
def _qk_norm_rope_kernel(q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, q_out_ptr,
                         k_out_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                         stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                         stride_ct, stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs,
                         stride_vch, n_q_heads, n_kv_heads, eps, k_sz_ptr, v_sz_ptr, stride_zb,
                         stride_zs, stride_zh, ROUND_QW: tl.constexpr, ROUND_KW: tl.constexpr,
                         HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                         STORE: tl.constexpr, PAGE: tl.constexpr, PDL: tl.constexpr,
                         QUANT: tl.constexpr, PAD: tl.constexpr):
    pdl_wait(PDL)
    t = tl.program_id(0).to(tl.int64)
    if tl.program_id(1) == 0:
        _norm_rope_heads(q_ptr, qw_ptr, cos_ptr, sin_ptr, q_out_ptr + t * n_q_heads * 2 * HALF,
                         2 * HALF, t, stride_qt, stride_qh, stride_ct, n_q_heads, eps, ROUND_QW,
                         HALF, BLOCK_HQ)
    elif STORE:  # k goes rotated straight into the cache, and v with it
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            block, offset = slot // PAGE, slot % PAGE
            if QUANT:
                _store_heads_quantized(k_ptr, v_ptr, kw_ptr, cos_ptr, sin_ptr, k_out_ptr,
                                       k_cache_ptr + block * stride_kcb + offset * stride_kcs,
                                       v_cache_ptr + block * stride_vcb + offset * stride_vcs,
                                       k_sz_ptr, v_sz_ptr, block * stride_zb + offset * stride_zs,
                                       t, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct,
                                       stride_kch, stride_vch, stride_zh, n_kv_heads, eps,
                                       ROUND_KW, HALF, BLOCK_HK, QUANT, PAD)
            else:
                _norm_rope_heads(k_ptr, kw_ptr, cos_ptr, sin_ptr,
                                 k_cache_ptr + block * stride_kcb + offset * stride_kcs,
                                 stride_kch, t, stride_kt, stride_kh, stride_ct, n_kv_heads, eps,
                                 ROUND_KW, HALF, BLOCK_HK)
                h = tl.arange(0, BLOCK_HK)[:, None]
                d = tl.arange(0, 2 * HALF)[None, :]
                v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=h < n_kv_heads)
                tl.store(v_cache_ptr + block * stride_vcb + offset * stride_vcs + h * stride_vch
                         + d, v.to(v_cache_ptr.dtype.element_ty), mask=h < n_kv_heads)
    else:
        _norm_rope_heads(k_ptr, kw_ptr, cos_ptr, sin_ptr, k_out_ptr + t * n_kv_heads * 2 * HALF,
                         2 * HALF, t, stride_kt, stride_kh, stride_ct, n_kv_heads, eps, ROUND_KW,
                         HALF, BLOCK_HK)


def heads_view(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch(q, k, v, q_weight, k_weight, cos, sin, eps, q_out, k_out, k_cache, v_cache,
            slot_mapping, kv_quant: KVQuant | None = None) -> None:
    T, n_q, D = q.shape
    n_kv = k.shape[1]
    if D & (D - 1) or D < 4:
        raise ValueError(f"qk_norm_rope: head_dim must be a power of two >= 4, got {D}")
    q, k = heads_view(q), heads_view(k)
    store = k_cache is not None
    if store:
        v = heads_view(v)
        if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
            raise ValueError("qk_norm_rope: the caches' head dimension must be contiguous")
        check_cache(k_cache, kv_quant, D)
        slot_mapping = slot_mapping.contiguous()
    else:
        v, k_cache, v_cache, slot_mapping = k, k_out, k_out, q_out  # unused placeholders
    cos, sin = cos.contiguous(), sin.contiguous()  # (T, D), one shared row stride
    block_hq = triton.next_power_of_2(n_q)
    kc = k_cache.stride() if store else (0, 0, 0)
    vc = v_cache.stride() if store else (0, 0, 0)
    quant, quant_consts = quant_args(kv_quant, q_out)
    _qk_norm_rope_kernel[(T, 2)](
        q, k, v, q_weight.contiguous(), k_weight.contiguous(), cos, sin, q_out, k_out, k_cache,
        v_cache, slot_mapping, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
        v.stride(1), cos.stride(0), kc[0], kc[1], kc[2], vc[0], vc[1], vc[2], n_q, n_kv, eps,
        *quant, ROUND_QW=q_weight.dtype == q.dtype, ROUND_KW=k_weight.dtype == k.dtype, HALF=D // 2,
        BLOCK_HQ=block_hq, BLOCK_HK=triton.next_power_of_2(n_kv), STORE=store,
        PAGE=k_cache.shape[1] if store else 1, **quant_consts, **pdl_args(pdl_enabled(q.device)),
        num_warps=4 if block_hq * D <= 2048 else 8)  # ~16 values per thread per live tile


def rope_out_dtype(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> torch.dtype:
    """The dtype :func:`vlmdeploy.kernels.reference.qk_norm_rope` gives x's heads."""
    rope_dtype = cos.dtype if sin.dtype == cos.dtype else torch.promote_types(cos.dtype, sin.dtype)
    return torch.promote_types(torch.promote_types(x.dtype, weight.dtype), rope_dtype)


def qk_norm_rope_triton(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor,
                        k_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`vlmdeploy.kernels.reference.qk_norm_rope`."""
    T, n_q, D = q.shape
    q_out = torch.empty(T, n_q, D, dtype=rope_out_dtype(q, q_weight, cos, sin), device=q.device)
    k_dtype = rope_out_dtype(k, k_weight, cos, sin)
    k_out = torch.empty(T, k.shape[1], D, dtype=k_dtype, device=k.device)
    if T:
        _launch(q, k, None, q_weight, k_weight, cos, sin, eps, q_out, k_out, None, None, None)
    return q_out, k_out


def qk_norm_rope_store_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor,
                              sin: torch.Tensor, eps: float, k_cache: torch.Tensor,
                              v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                              kv_quant: KVQuant | None = None) -> torch.Tensor:
    """Triton twin of :func:`vlmdeploy.kernels.reference.qk_norm_rope_store`: the rotated k and v
    are written into the caches by the same program, not returned."""
    T, n_q, D = q.shape
    q_out = torch.empty(T, n_q, D, dtype=rope_out_dtype(q, q_weight, cos, sin), device=q.device)
    k_out = q_out  # unused placeholder; a quantised store reads the rotated k's dtype from it
    if is_quantized(kv_quant):
        k_out = torch.empty(0, dtype=rope_out_dtype(k, k_weight, cos, sin), device=q.device)
    if T:
        _launch(q, k, v, q_weight, k_weight, cos, sin, eps, q_out, k_out, k_cache, v_cache,
                slot_mapping, kv_quant)
    return q_out
