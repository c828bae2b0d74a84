"""Registers the Triton kernels as the CUDA implementations of the ops in :mod:`vlmdeploy.kernels`.

Imported lazily by the package on the first op called with a CUDA tensor; an ImportError here (no
triton) leaves the reference path in place. Each launcher has the signature and semantics of its
reference twin.
"""

from __future__ import annotations

import torch

from . import _TRITON
from .decode_attention import decode_attention
from .fp8_gemm_kernel import fp8_linear_triton
from .fused_moe_kernel import fused_moe_triton
from .kv_quant import KVQuant
from .linear_row_kernel import linear_row_triton
from .moe_route_kernel import moe_route_triton
from .prefill_attention import prefill_attention
from .qk_norm_rope_kernel import qk_norm_rope_store_triton, qk_norm_rope_triton
from .rms_norm_kernel import rms_norm_triton
from .scaled_add_norm_kernel import scaled_add_norm_triton
from .silu_and_mul_kernel import silu_and_mul_triton
from .store_kv_kernel import store_kv_triton
from .w4a16_kernel import w4a16_linear_triton


def paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           cu_seqlens_q: torch.Tensor, kv_lens: torch.Tensor,
                           block_tables: torch.Tensor, scale: float, max_q_len: int | None = None,
                           max_kv_len: int | None = None, num_decode: int = 0,
                           sinks: torch.Tensor | None = None,
                           window: int | None = None,
                           kv_quant: KVQuant | None = None) -> torch.Tensor:
    """Triton twin of :func:`vlmdeploy.kernels.reference.paged_attention`.

    A pure decode batch (``max_q_len == 1``) takes the split-K decode kernel; prefill and chunked
    prefill the varlen prefill kernel. In a mixed batch the first ``num_decode`` sequences (one new
    token each, the scheduler puts them first) take the decode kernel and the rest the prefill
    kernel, both writing into one output: the prefill kernel's grid is sized by the longest chunk,
    so one-token rows in it would be mostly empty programs. Without hints, one device read decides.
    ``sinks`` and ``window`` (GPT-OSS) and ``kv_quant`` (a quantised cache) reach both kernels.
    """
    opts = dict(sinks=sinks, window=window, kv_quant=kv_quant)
    if max_q_len is None and q.shape[0] > 0:
        max_q_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item())
    if max_q_len == 1:
        return decode_attention(q, k_cache, v_cache, cu_seqlens_q, kv_lens, block_tables, scale,
                                max_kv_len=max_kv_len, **opts)
    nd = num_decode
    if nd <= 0:
        return prefill_attention(q, k_cache, v_cache, cu_seqlens_q, kv_lens, block_tables, scale,
                                 max_q_len=max_q_len, **opts)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    # the decode rows are tokens 0..nd-1 (prefix slices start where the tensors do); the prefill
    # kernel skips the first nd sequences
    decode_attention(q[:nd], k_cache, v_cache, cu_seqlens_q[: nd + 1], kv_lens[:nd],
                     block_tables[:nd], scale, max_kv_len=max_kv_len, out=out[:nd], **opts)
    prefill_attention(q, k_cache, v_cache, cu_seqlens_q, kv_lens, block_tables, scale,
                      max_q_len=max_q_len, out=out, seq_offset=nd, **opts)
    return out


def paged_attention_norm_rope_triton(q, k, v, q_weight, k_weight, cos, sin, eps, k_cache, v_cache,
                                    slot_mapping, cu_seqlens_q, kv_lens, block_tables, scale,
                                    max_q_len=None, max_kv_len=None, num_decode=0, kv_quant=None):
    """Triton twin of :func:`vlmdeploy.kernels.reference.paged_attention_norm_rope`. A pure decode
    batch goes to the decode kernel with the raw q/k/v (it may normalise, rotate and store them in
    the same launch); other batches store first, then attend."""
    if max_q_len is None and q.shape[0] > 0:
        max_q_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item())
    if max_q_len == 1:
        return decode_attention(q, k_cache, v_cache, cu_seqlens_q, kv_lens, block_tables, scale,
                                max_kv_len=max_kv_len, kv_quant=kv_quant,
                                norm_rope=(k, v, q_weight, k_weight, cos, sin, eps, slot_mapping))
    q = qk_norm_rope_store_triton(q, k, v, q_weight, k_weight, cos, sin, eps, k_cache, v_cache,
                                  slot_mapping, kv_quant)
    return paged_attention_triton(q, k_cache, v_cache, cu_seqlens_q, kv_lens, block_tables, scale,
                                  max_q_len, max_kv_len, num_decode, kv_quant=kv_quant)


_TRITON.update(
    rms_norm=rms_norm_triton,
    scaled_add_norm=scaled_add_norm_triton,
    silu_and_mul=silu_and_mul_triton,
    qk_norm_rope=qk_norm_rope_triton,
    qk_norm_rope_store=qk_norm_rope_store_triton,
    store_kv=store_kv_triton,
    paged_attention=paged_attention_triton,
    paged_attention_norm_rope=paged_attention_norm_rope_triton,
    linear_row=linear_row_triton,
    fused_moe=fused_moe_triton,
    moe_route=moe_route_triton,
    fp8_linear=fp8_linear_triton,
    w4a16_linear=w4a16_linear_triton,
)
