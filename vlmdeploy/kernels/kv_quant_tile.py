"""Triton building blocks for quantised KV caches, the numerics of
:mod:`vlmdeploy.kernels.kv_quant` in registers: quantise rows and store them, load a tile of tokens
and dequantise it.

The kernels that write the cache (``store_kv``, ``qk_norm_rope_store``, the fused decode) and the
attention kernels that read it take the policy as a ``QUANT`` constexpr; with 0 none of this is
compiled, and they run the code of an unquantised cache. Divisions are ``div_rn`` (IEEE rounding,
as PyTorch's): Triton's ``/`` on fp32 is approximate on NVIDIA GPUs, and a code one off from the
reference's would make the kernels' caches differ from it. Roundings to bf16 and to fp8 are written
out as integer operations (round to nearest, ties to even, as the GPU's conversions and PyTorch's):
Triton's CPU interpreter truncates the one and loses the carry of the other.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kv_quant import FP8, FP8_MAX, INT4, INT8, STEP_FLOOR, KVQuant, is_quantized, scale_pad

_INT4 = tl.constexpr(INT4)
_INT8 = tl.constexpr(INT8)
_FP8 = tl.constexpr(FP8)
_FP8_MAX = tl.constexpr(FP8_MAX)
_STEP_FLOOR = tl.constexpr(STEP_FLOOR)


@triton.jit
def _round_bf16(x):
    """fp32 → the nearest bf16 value (ties to even), as fp32."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _round_to(x, ty: tl.constexpr):
    """fp32 → the nearest value of ``ty``, as fp32."""
    if ty == tl.bfloat16:
        out = _round_bf16(x)
    else:
        out = x.to(ty).to(tl.float32)
    return out


@triton.jit
def _round_fp8(x):
    """fp32 within ±448 → the nearest float8_e4m3fn value (ties to even), as fp32: x in units of
    its binade's step (2^(e-3), at least the subnormals' 2^-9), rounded by the 1.5 · 2^23 trick."""
    e = ((x.to(tl.uint32, bitcast=True) >> 23) & 0xFF).to(tl.int32) - 127
    e = tl.maximum(e, -6)
    step = ((e + 124) << 23).to(tl.float32, bitcast=True)  # 2^(e - 3)
    inv_step = ((130 - e) << 23).to(tl.float32, bitcast=True)
    units = (x * inv_step + 12582912.0) - 12582912.0
    return units * step


@triton.jit
def _quantize_int(x, QMAX: tl.constexpr, sz_ty: tl.constexpr, PAD: tl.constexpr):
    lo = tl.min(x, axis=1)
    hi = tl.max(x, axis=1)
    step = tl.maximum(tl.math.div_rn(hi - lo, QMAX),
                      tl.maximum(tl.abs(lo), tl.abs(hi)) * _STEP_FLOOR)
    scale = _round_to(step * PAD, sz_ty)  # as stored
    div = tl.where(scale > 0, scale, 1.0)  # an all-zero row: scale 0, codes 0, zero 0
    zero = _round_to(tl.math.div_rn(-lo, div), sz_ty)
    q = tl.floor(tl.math.div_rn(x, div[:, None]) + zero[:, None] + 0.5)
    return tl.minimum(tl.maximum(q, 0.0), QMAX), scale, zero


@triton.jit
def quantize_rows(x, QUANT: tl.constexpr, sz_ty: tl.constexpr, PAD: tl.constexpr):
    """Heads x (R, D) → (q (R, D), scale (R,), zero (R,)), fp32: for int4/int8 the integer codes
    and the pair as stored, for fp8 the saturated fp8 values with scale 1 and zero 0, so that
    :func:`dequantize_rows` gives what a later load of the cache will."""
    x = x.to(tl.float32)
    if QUANT == _INT4:
        q, scale, zero = _quantize_int(x, 15.0, sz_ty, PAD)
    elif QUANT == _INT8:
        q, scale, zero = _quantize_int(x, 255.0, sz_ty, PAD)
    else:
        q = _round_fp8(tl.clamp(x, -_FP8_MAX, _FP8_MAX))
        zero = tl.zeros((q.shape[0],), tl.float32)
        scale = zero + 1.0
    return q, scale, zero


@triton.jit
def dequantize_rows(q, scale, zero):
    """(R, D) fp32 from :func:`quantize_rows`' triple."""
    return (q - zero[:, None]) * scale[:, None]


@triton.jit
def store_quantized(cache_row, sz_row, q, scale, zero, row_mask, QUANT: tl.constexpr,
                    HEAD_DIM: tl.constexpr):
    """Write :func:`quantize_rows`' result: row r's codes at ``cache_row[r]`` (R, 1) pointers to
    each head's first element, its scale and zero at ``sz_row[r]`` (R,) and the next element;
    rows where ``row_mask`` (R,) is False are skipped."""
    if QUANT == _INT4:  # byte j: element j in the low nibble, j + D/2 in the high one
        halves = tl.permute(tl.reshape(q, (q.shape[0], 2, HEAD_DIM // 2)), (0, 2, 1))
        first, second = tl.split(halves)  # (R, D/2) each
        codes = first.to(tl.uint8) | (second.to(tl.uint8) << 4)
        tl.store(cache_row + tl.arange(0, HEAD_DIM // 2)[None, :], codes, mask=row_mask[:, None])
    else:
        tl.store(cache_row + tl.arange(0, HEAD_DIM)[None, :],
                 q.to(cache_row.dtype.element_ty), mask=row_mask[:, None])
    if QUANT != _FP8:
        sz_ty = sz_row.dtype.element_ty
        tl.store(sz_row, scale.to(sz_ty), mask=row_mask)
        tl.store(sz_row + 1, zero.to(sz_ty), mask=row_mask)


@triton.jit
def store_rows(x, cache_row, sz_row, row_mask, QUANT: tl.constexpr, PAD: tl.constexpr,
               HEAD_DIM: tl.constexpr):
    """Quantise heads x (R, D) and store them (:func:`store_quantized`)."""
    q, scale, zero = quantize_rows(x, QUANT, sz_row.dtype.element_ty, PAD)
    store_quantized(cache_row, sz_row, q, scale, zero, row_mask, QUANT, HEAD_DIM)


@triton.jit
def load_rows(cache_ptr, sz_ptr, row, sz_off, d, mask, QUANT: tl.constexpr,
              HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, out_ty: tl.constexpr):
    """Tokens' heads dequantised: ``row`` (N,) offsets of each head's codes in the cache,
    ``sz_off`` (N,) of its scale and zero; ``d`` is ``arange(0, HEAD_DIM)``. → (N, D) out_ty.
    Masked rows (``MASKED``, ``mask`` (N,)) read as zeros."""
    if QUANT == _INT4:
        col = d % (HEAD_DIM // 2)
        shift = (d // (HEAD_DIM // 2)) * 4  # the high nibble holds the second half
    else:
        col = d
    if MASKED:  # masked rows must read finite (their probabilities are 0, times V)
        if QUANT == _FP8:
            codes = tl.load(cache_ptr + row[:, None] + col[None, :], mask=mask[:, None],
                            other=0.0)
        else:
            codes = tl.load(cache_ptr + row[:, None] + col[None, :], mask=mask[:, None], other=0)
    else:
        codes = tl.load(cache_ptr + row[:, None] + col[None, :])
    if QUANT == _FP8:
        out = codes.to(out_ty)
    else:
        if QUANT == _INT4:
            codes = (codes.to(tl.int32) >> shift[None, :]) & 0xF
        if MASKED:
            scale = tl.load(sz_ptr + sz_off, mask=mask, other=0.0).to(tl.float32)
            zero = tl.load(sz_ptr + sz_off + 1, mask=mask, other=0.0).to(tl.float32)
        else:
            scale = tl.load(sz_ptr + sz_off).to(tl.float32)
            zero = tl.load(sz_ptr + sz_off + 1).to(tl.float32)
        out = dequantize_rows(codes.to(tl.float32), scale, zero).to(out_ty)
    return out


def quant_args(kv_quant: KVQuant | None, placeholder: torch.Tensor) -> tuple[tuple, dict]:
    """A launch's quantisation arguments: ``(k_scales_zeros, v_scales_zeros, stride over blocks,
    over slots, over heads)`` and the constexprs ``QUANT`` and ``PAD``; unused placeholders
    without a quantised cache."""
    if not is_quantized(kv_quant):
        return (placeholder, placeholder, 0, 0, 0), dict(QUANT=0, PAD=1.0)
    ks, vs = kv_quant.k_scales_zeros, kv_quant.v_scales_zeros
    if ks is None:  # fp8: no scales
        return (placeholder, placeholder, 0, 0, 0), dict(QUANT=kv_quant.policy, PAD=1.0)
    if ks.stride() != vs.stride() or ks.stride(-1) != 1:
        raise ValueError("kv quantisation: k and v scales must share one layout, pairs contiguous")
    pad = scale_pad(ks.dtype)
    return (ks, vs, ks.stride(0), ks.stride(1), ks.stride(2)), dict(QUANT=kv_quant.policy, PAD=pad)


def check_cache(k_cache: torch.Tensor, kv_quant: KVQuant | None, head_dim: int) -> None:
    """A cache's last dimension must be what its policy stores for ``head_dim``."""
    width = head_dim // 2 if is_quantized(kv_quant) and kv_quant.policy == INT4 else head_dim
    if k_cache.shape[-1] != width:
        raise ValueError(f"KV cache of width {k_cache.shape[-1]} for head_dim {head_dim} "
                         f"under quant_policy {kv_quant.policy if kv_quant else 0}")
