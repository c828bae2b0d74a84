"""Scatter the new tokens' keys and values into the paged KV cache.

Same contract as :func:`vlmdeploy.kernels.reference.store_kv`: k/v (T, Hkv, D) go to the caches
(num_blocks, block_size, Hkv, D) at ``slot_mapping`` (T,), where slot = block_id * block_size +
offset and a negative slot means "skip" (padding tokens of a CUDA-graph batch, tokens whose KV is
already cached). One program moves one token's k and v; k and v may be strided views (v is usually a
slice of the fused qkv output). A quantised cache (``kv_quant``) gets each head quantised by the
same program, its scale and zero point beside (:mod:`vlmdeploy.kernels.kv_quant`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kv_quant import KVQuant
from .kv_quant_tile import check_cache, quant_args, store_rows
from .pdl import pdl_args, pdl_enabled, pdl_wait


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_kc_b, stride_kc_s, stride_kc_h, stride_vc_b, stride_vc_s, stride_vc_h,
                     n_heads, k_sz_ptr, v_sz_ptr, stride_zb, stride_zs, stride_zh,
                     HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK_D: tl.constexpr, PDL: tl.constexpr, QUANT: tl.constexpr,
                     PAD: tl.constexpr):
    pdl_wait(PDL)
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < n_heads) & (d < HEAD_DIM)
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    if QUANT:  # BLOCK_D == HEAD_DIM (a power of two): a head's statistics span its whole row
        heads = tl.arange(0, BLOCK_H)
        k_row = k_cache_ptr + block * stride_kc_b + offset * stride_kc_s + h * stride_kc_h
        v_row = v_cache_ptr + block * stride_vc_b + offset * stride_vc_s + h * stride_vc_h
        sz = block * stride_zb + offset * stride_zs + heads * stride_zh  # (BLOCK_H,)
        store_rows(k, k_row, k_sz_ptr + sz, heads < n_heads, QUANT, PAD, HEAD_DIM)
        store_rows(v, v_row, v_sz_ptr + sz, heads < n_heads, QUANT, PAD, HEAD_DIM)
    else:
        k_dst = k_cache_ptr + block * stride_kc_b + offset * stride_kc_s + h * stride_kc_h + d
        v_dst = v_cache_ptr + block * stride_vc_b + offset * stride_vc_s + h * stride_vc_h + d
        tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def store_kv_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, kv_quant: KVQuant | None = None) -> None:
    """Triton twin of :func:`vlmdeploy.kernels.reference.store_kv` (writes the caches in place)."""
    T, n_heads, head_dim = k.shape
    if T == 0:
        return
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("store_kv: the caches' head dimension must be contiguous")
    check_cache(k_cache, kv_quant, head_dim)
    k, v = _unit_last(k), _unit_last(v)
    quant, consts = quant_args(kv_quant, k)
    if consts["QUANT"] and head_dim & (head_dim - 1):
        raise ValueError(f"store_kv: a quantised cache needs a power-of-two head_dim ({head_dim})")
    _store_kv_kernel[(T,)](
        k, v, k_cache, v_cache, slot_mapping.contiguous(),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        n_heads, *quant, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_H=triton.next_power_of_2(n_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4, **consts, **pdl_args(pdl_enabled(k.device)))
