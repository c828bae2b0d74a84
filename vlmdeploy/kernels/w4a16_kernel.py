"""Linear layers over AWQ's 4-bit weights (w4a16): the weight is dequantised inside the kernel, so
only its 4-bit words, the zero points and the scales are read from memory.

Same contract as :func:`vlmdeploy.kernels.quant_reference.w4a16_linear`. A program works on a tile
of packed words (K rows × N / 8 words) and keeps the columns in the words' own order: nibble ``i``
of word ``p`` is column ``8p + AWQ_ORDER[i]``. The zero points are packed the same way, so they
unpack in the same order; only the scales and the output are addressed through the order. Each K
step stays inside one group of G inputs, so one row of zero points and scales serves the tile.

* **GEMM** (two rows and more): the dequantised tile, rounded to the activations' dtype, feeds
  ``tl.dot`` with fp32 accumulation.
* **GEMV** (one row: batch-1 decode): a multiply-add over the unpacked tile and one reduction at
  the end, like ``linear_row``'s row kernel; each program streams its columns' words once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_tile import dot_precision, mma
from .device import multiprocessors


@triton.jit
def _unpack(words):
    """int32 words (R, P) → their nibbles (R, P * 8), words' order, as int32 0..15."""
    nib = (words[:, :, None] >> (tl.arange(0, 8) * 4)[None, None, :]) & 0xF  # (R, P, 8)
    return tl.reshape(nib, (words.shape[0], words.shape[1] * 8))


@triton.jit
def _columns(pid_n, BLOCK_N: tl.constexpr):
    """The tile's packed-word indices (BLOCK_N / 8,) and, in the words' nibble order, the logical
    output column of each unpacked position (BLOCK_N,)."""
    rp = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
    i = tl.arange(0, BLOCK_N) % 8  # nibble index
    order = (i % 4) * 2 + i // 4  # AWQ_ORDER[i]: 0, 2, 4, 6, 1, 3, 5, 7
    return rp, pid_n * BLOCK_N + (tl.arange(0, BLOCK_N) // 8) * 8 + order


@triton.jit
def _w4a16_gemm_kernel(a_ptr, qw_ptr, qz_ptr, s_ptr, c_ptr, M, N, K,
                       stride_am, stride_qw, stride_qz, stride_s, stride_cm,
                       GROUP: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(1), tl.program_id(0)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    rp, rn = _columns(pid_n, BLOCK_N)
    m_mask, n_mask, p_mask = rm < M, rn < N, rp < N // 8
    a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * stride_am + rk[None, :]
    w_ptrs = qw_ptr + rk.to(tl.int64)[:, None] * stride_qw + rp[None, :]  # (BLOCK_K, BLOCK_N / 8)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # K is a multiple of GROUP, GROUP of BLOCK_K
        g = k0 // GROUP
        z = _unpack(tl.load(qz_ptr + g * stride_qz + rp[None, :], mask=p_mask[None, :],
                            other=0))  # (1, BLOCK_N)
        s = tl.load(s_ptr + g * stride_s + rn, mask=n_mask, other=0.0).to(tl.float32)
        q = _unpack(tl.load(w_ptrs, mask=p_mask[None, :], other=0))  # (BLOCK_K, BLOCK_N)
        a = tl.load(a_ptrs, mask=m_mask[:, None], other=0.0)
        w = ((q - z).to(tl.float32) * s[None, :]).to(a.dtype)
        acc += mma(a, w, PRECISION, UPCAST)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_qw
    c = acc.to(c_ptr.dtype.element_ty)
    tl.store(c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :], c,
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _w4a16_gemv_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, out_ptr, N, K, stride_qw, stride_qz,
                       stride_s, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    rk = tl.arange(0, BLOCK_K)
    rp, rn = _columns(pid_n, BLOCK_N)
    n_mask, p_mask = rn < N, rp < N // 8
    w_ptrs = qw_ptr + rk.to(tl.int64)[:, None] * stride_qw + rp[None, :]
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        g = k0 // GROUP
        z = _unpack(tl.load(qz_ptr + g * stride_qz + rp[None, :], mask=p_mask[None, :],
                            other=0))
        s = tl.load(s_ptr + g * stride_s + rn, mask=n_mask, other=0.0).to(tl.float32)
        q = _unpack(tl.load(w_ptrs, mask=p_mask[None, :], other=0))
        x = tl.load(x_ptr + k0 + rk).to(tl.float32)
        # the weight rounded to the activations' dtype, as the GEMM and the reference have it
        w = ((q - z).to(tl.float32) * s[None, :]).to(x_ptr.dtype.element_ty).to(tl.float32)
        acc += x[:, None] * w
        w_ptrs += BLOCK_K * stride_qw
    y = tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rn, y, mask=n_mask)


def choose_w4a16_config(m: int, n: int, sms: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps); BLOCK_M 1 is the GEMV. N tiles as wide as still
    give every multiprocessor a program; the GEMV's at most 64, since its (BLOCK_K, BLOCK_N)
    accumulator and unpacked tile live in registers. Not tuned yet (``benchmarks/quant_gemm.py``
    measures them)."""
    widths = (64,) if m == 1 else (128, 64)
    block_n = next((b for b in widths if triton.cdiv(n, b) >= sms), 32)
    if m == 1:
        return 1, block_n, 64, 4
    block_m = min(64, max(16, triton.next_power_of_2(m)))
    return block_m, block_n, 64, 4


def w4a16_linear_triton(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor,
                        scales: torch.Tensor, group_size: int,
                        bias: torch.Tensor | None = None,
                        config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """Triton twin of :func:`vlmdeploy.kernels.quant_reference.w4a16_linear`; x (..., K),
    ``qweight`` (K, N / 8). One row takes the GEMV, more the GEMM (``config`` = (BLOCK_M,
    BLOCK_N, BLOCK_K, num_warps) overrides the choice; BLOCK_M 1 is the GEMV)."""
    lead, k = x.shape[:-1], x.shape[-1]
    n = qweight.shape[1] * 8
    if qweight.shape[0] != k or k % group_size:
        raise ValueError(f"x has {k} features for an AWQ weight of {qweight.shape[0]} inputs in "
                         f"groups of {group_size}")
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m and n:
        x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
        block_m, block_n, block_k, warps = config or choose_w4a16_config(
            m, n, multiprocessors(x.device))
        block_k = min(block_k, group_size)  # one group of zero points and scales per K step
        if group_size % block_k:
            raise ValueError(f"group size {group_size} is not a multiple of BLOCK_K {block_k}")
        common = (qweight, qzeros, scales)
        if block_m == 1:
            for row in range(m):  # the GEMV is meant for one row; more rows read the weight again
                _w4a16_gemv_kernel[(triton.cdiv(n, block_n),)](
                    x2[row], *common, out[row], n, k, qweight.stride(0), qzeros.stride(0),
                    scales.stride(0), GROUP=group_size, BLOCK_N=block_n, BLOCK_K=block_k,
                    num_warps=warps)
        else:
            grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
            _w4a16_gemm_kernel[grid](
                x2, *common, out, m, n, k, x2.stride(0), qweight.stride(0), qzeros.stride(0),
                scales.stride(0), out.stride(0), GROUP=group_size,
                PRECISION=dot_precision(x.dtype), UPCAST=not x.is_cuda, BLOCK_M=block_m,
                BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    if bias is not None:
        out += bias.to(out.dtype)
    return out.reshape(*lead, n)
