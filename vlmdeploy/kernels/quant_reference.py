"""PyTorch semantics of the linear layers over quantised weights; the Triton kernels
(:mod:`fp8_gemm_kernel`, :mod:`w4a16_kernel`) reproduce them, and on the CPU they are the ops.

**Blocked FP8 (w8a8)**, the layout of DeepSeek-V3's and Qwen3-FP8's checkpoints: a weight (N, K)
is stored as ``float8_e4m3fn`` with one float32 scale per (128, 128) block,
``weight_scale_inv`` (ceil(N / 128), ceil(K / 128)); the weight is ``q * s`` blockwise (the
checkpoints' name notwithstanding, the scale multiplies). A block's scale is its largest magnitude
over 448, e4m3's largest finite value. Activations are quantised on the fly the same way, one
scale per token per group of 128 along K, so every product inside one K-block shares the factor
``x_s[m, kb] * w_s[n // 128, kb]``: a GEMM sums fp8 × fp8 products of a K-block exactly in fp32
and scales each block's partial sum once.

**AWQ (w4a16)**, the layout AutoAWQ's GEMM version and LMDeploy's ``lite auto_awq`` write: for a
weight of K inputs and N outputs, ``qweight`` (K, N / 8) int32 holds eight 4-bit values per word,
``qzeros`` (K / G, N / 8) int32 the zero points of each group of G inputs packed alike, ``scales``
(K / G, N) float16; ``W[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n]`` and ``y = x @ W``. A word
holds its eight columns out of order: nibble ``i`` (bits 4i..4i+3) is column ``AWQ_ORDER[i]``.
The weight is rounded to the activations' dtype before the product, as a tensor-core kernel must.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # e4m3fn's largest finite value
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # the column of a packed word's nibble i (AutoAWQ's order)


def fp8_quantize_blocks(
    x: torch.Tensor, block: tuple[int, int] = (128, 128)
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (R, C) → (``float8_e4m3fn`` (R, C), float32 scales (ceil(R / br), ceil(C / bc))) with
    ``x ≈ q * scale`` over each (br, bc) block; edge blocks may be partial. An all-zero block
    gets scale 1."""
    rows, cols = x.shape
    br, bc = block
    nr, nc = -(-rows // br), -(-cols // bc)
    padded = F.pad(x.float(), (0, nc * bc - cols, 0, nr * br - rows))
    blocks = padded.view(nr, br, nc, bc)
    amax = blocks.abs().amax(dim=(1, 3))  # (nr, nc)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    # x / scale can land a rounding step above 448, which e4m3fn cannot hold: clamp first
    q = (blocks / scale[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(nr * br, nc * bc)[:rows, :cols].contiguous(), scale


def fp8_dequantize_blocks(
    q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = (128, 128)
) -> torch.Tensor:
    """The inverse of :func:`fp8_quantize_blocks`: ``q * scale`` blockwise, float32 (R, C)."""
    rows, cols = q.shape
    (br, bc), (nr, nc) = block, scale.shape
    x = F.pad(q.float(), (0, nc * bc - cols, 0, nr * br - rows))  # whole blocks
    x = x.view(nr, br, nc, bc) * scale.float()[:, None, :, None]
    return x.view(nr * br, nc * bc)[:rows, :cols]


def fp8_quantize_act(x: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations (M, K) → fp8 (M, K) and float32 scales (M, ceil(K / group)): one scale per
    token per group of ``group`` along K."""
    return fp8_quantize_blocks(x, (1, group))


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale_inv: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ Wᵀ (+ bias)`` with W (N, K) in blocked FP8 and x (..., K) quantised per token per
    group of ``block[1]`` (see the module docstring); products summed in fp32, the result in x's
    dtype."""
    lead, k = x.shape[:-1], x.shape[-1]
    xq, xs = fp8_quantize_act(x.reshape(-1, k), block[1])
    xd = fp8_dequantize_blocks(xq, xs, (1, block[1]))  # (M, K) fp32
    y = xd @ fp8_dequantize_blocks(weight, weight_scale_inv, block).T  # (M, N) fp32
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, -1)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """AWQ-packed int32 (R, C / 8) → int32 (R, C) in column order (values 0..15)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed[..., None] >> shifts) & 0xF  # (R, C / 8, 8): nibble i of each word
    out = torch.empty_like(nibbles)
    out[..., list(AWQ_ORDER)] = nibbles  # nibble i is column AWQ_ORDER[i]
    return out.flatten(-2)


def awq_dequantize(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> torch.Tensor:
    """The float32 weight (K, N) of an AWQ triple (see the module docstring)."""
    q, z = unpack_int4(qweight), unpack_int4(qzeros)  # (K, N), (K / G, N)
    z = z.repeat_interleave(group_size, 0)
    return (q - z).float() * scales.float().repeat_interleave(group_size, 0)


def w4a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W (+ bias)`` for x (..., K) and the AWQ weight W (K, N), rounded to x's dtype first;
    the result in x's dtype."""
    w = awq_dequantize(qweight, qzeros, scales, group_size).to(x.dtype)  # (K, N)
    y = x @ w
    return y if bias is None else y + bias.to(x.dtype)
