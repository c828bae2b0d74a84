"""Quantised KV caches (LMDeploy's ``quant_policy``): their layout and their PyTorch semantics.

A policy fixes what the cache holds for one token of one kv head, of head_dim D:

* ``0``: the head as it is, in the cache dtype (the activations').
* ``8`` (int8): D uint8 codes and a (scale, zero) pair, ``x ≈ (code - zero) * scale``.
* ``4`` (int4): the same with 4-bit codes, two to a byte: byte j holds element j in its low nibble
  and element j + D/2 in its high one, so a head takes D/2 bytes.
* ``16`` (fp8): D float8_e4m3fn values. LMDeploy's PyTorch engine gives this policy a fixed
  per-tensor scale of 1.0, so the store is a cast that saturates at ±448 and the load a cast back.

The integer policies are asymmetric with a scale and a zero point per token and per head, kept as
LMDeploy keeps them: beside the codes, a ``(…, 2)`` tensor in the activations' dtype holding the
scale and the zero point (in code units). Each row is quantised with the pair *as stored*: the
scale is rounded to the storage dtype first (widened by one unit in its last place, so rounding
never leaves it too small for the row's range) and the zero point computed from it, so the pair
read back is exactly the one that made the codes. An element's error is then at most half a step
(``scale / 2``) while the stored zero point is within half a code of the exact one (|zero| < 256
in bf16, < 2048 in fp16), else the zero point's rounding times the scale. The step is at least
``absmax · 2⁻¹²``: a row of nearly equal values gets |zero| ≤ 4096 (in range even for fp16)
rather than an enormous one, at a resolution still finer than bf16's own.

:func:`quantize_kv` and :func:`dequantize_kv` define the numerics; the Triton kernels
(:mod:`vlmdeploy.kernels.kv_quant_tile`) reproduce them bit for bit, every division rounded to
nearest as here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

NONE, INT4, INT8, FP8 = 0, 4, 8, 16
POLICIES = (NONE, INT4, INT8, FP8)
QMAX = {INT4: 15, INT8: 255}
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value
STEP_FLOOR = 2.0**-12  # the least step, relative to the row's largest magnitude


class KVQuant(NamedTuple):
    """How one layer's k and v caches are stored: the policy and, for int4/int8, the
    ``(blocks, block_size, kv_heads, 2)`` scales and zero points beside each cache."""

    policy: int
    k_scales_zeros: torch.Tensor | None = None
    v_scales_zeros: torch.Tensor | None = None


def is_quantized(kv_quant: KVQuant | None) -> bool:
    return kv_quant is not None and kv_quant.policy != NONE


# ---- layout ------------------------------------------------------------------------------------
def cache_dtype(policy: int, dtype: torch.dtype) -> torch.dtype:
    """The cache's element type for activations of ``dtype``."""
    return {NONE: dtype, INT4: torch.uint8, INT8: torch.uint8, FP8: FP8_DTYPE}[policy]


def cache_width(policy: int, head_dim: int) -> int:
    """Elements of the cache's last dimension for one head."""
    return head_dim // 2 if policy == INT4 else head_dim


def has_scales(policy: int) -> bool:
    return policy in QMAX


def bytes_per_head(policy: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one token's k (or v) of one kv head takes: codes, plus the scale and zero point."""
    codes = cache_width(policy, head_dim) * cache_dtype(policy, dtype).itemsize
    return codes + (2 * dtype.itemsize if has_scales(policy) else 0)


def scale_pad(dtype: torch.dtype) -> float:
    """Widening of a scale before it is rounded to ``dtype``: one unit in the last place, so the
    rounded scale is never below the exact one."""
    return 1.0 + torch.finfo(dtype).eps


# ---- numerics ----------------------------------------------------------------------------------
def quantize_kv(
    x: torch.Tensor, policy: int, meta_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Heads x (…, D) → (codes (…, cache_width), scales_zeros (…, 2) in ``meta_dtype``, or None
    for fp8)."""
    xf = x.float()
    if policy == FP8:
        return xf.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), None
    qmax = QMAX[policy]
    lo, hi = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)  # (…, 1)
    step = torch.maximum((hi - lo) / qmax, torch.maximum(lo.abs(), hi.abs()) * STEP_FLOOR)
    scale = (step * scale_pad(meta_dtype)).to(meta_dtype).float()
    div = torch.where(scale > 0, scale, 1.0)  # an all-zero row: scale 0, codes 0, zero 0
    zero = (-lo / div).to(meta_dtype).float()
    q = torch.floor(xf / div + zero + 0.5).clamp(0, qmax).to(torch.uint8)
    if policy == INT4:
        half = q.shape[-1] // 2
        q = q[..., :half] | (q[..., half:] << 4)
    return q, torch.cat([scale, zero], dim=-1).to(meta_dtype)


def dequantize_kv(
    codes: torch.Tensor, scales_zeros: torch.Tensor | None, policy: int, dtype: torch.dtype
) -> torch.Tensor:
    """Codes (…, cache_width) and their (…, 2) scales and zeros → heads (…, D) in ``dtype``,
    computed in fp32 and rounded once."""
    if policy == FP8:
        return codes.float().to(dtype)
    if policy == INT4:
        codes = torch.cat([codes & 0xF, codes >> 4], dim=-1)
    sz = scales_zeros.float()
    return ((codes.float() - sz[..., 1:]) * sz[..., :1]).to(dtype)
