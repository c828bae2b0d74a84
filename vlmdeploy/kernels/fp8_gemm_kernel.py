"""Blocked-FP8 linear layers on FP8 tensor cores (w8a8, 128 × 128 weight blocks).

Same contract as :func:`vlmdeploy.kernels.quant_reference.fp8_linear`. Two launches: the
activations are quantised per token per group of 128 (:func:`fp8_quantize_act_triton`), then a
GEMM multiplies fp8 by fp8. Its K loop steps one 128-wide block at a time, so each step's
``tl.dot`` partial sum (exact fp32 sums of fp8 products) takes one activation scale per row and one
weight scale per program: the N tile divides 128, so all its columns share a weight block row.

The GEMM is either this module's Triton kernel or cuBLAS's blockwise-scaled FP8 GEMM through
``torch._scaled_mm`` (1 × 128 activation blocks, 128 × 128 weight blocks; Hopper with CUDA 12.9 or
newer); ``VLMDEPLOY_FP8_GEMM`` picks one, so the two can be measured against each other
(``benchmarks/quant_gemm.py``). The activation scales are written K-block-major, the layout
cuBLAS asks for, and the Triton kernel reads them through strides.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from vlmdeploy import env

from .device import multiprocessors
from .quant_reference import FP8

ACT_GROUPS = 8  # groups of 128 quantised per program: 1,024 values


@triton.jit
def _e4m3_grid(v):
    """``v`` (fp32, within ±448) rounded to the nearest e4m3 value, ties to even, still fp32. The
    conversion after it is then exact: Triton's interpreter rounds a mantissa that carries into the
    next binade wrongly (124.3 became 64), the GPU's conversion rounds like this."""
    bits = v.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # below 2^-6 e4m3 is subnormal: fixed step
    step = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 2^(e - 3): 3 mantissa bits
    u = v * ((3 - e + 127) << 23).to(tl.float32, bitcast=True)  # v / step, exact: |u| <= 16
    return ((u + 12582912.0) - 12582912.0) * step  # 1.5 * 2^23: the adder rounds u to an integer


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, K, num_groups, stride_x, stride_q,
                      stride_sm, stride_sg, GROUP: tl.constexpr, GROUPS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)  # (GROUPS,) group indices
    cols = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # (GROUPS, GROUP)
    mask = cols < K
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    # correctly rounded divisions, as torch's: an approximate one could change a scale's last bit
    # or move a value across an fp8 rounding boundary (div_rn does not broadcast its operands)
    s = tl.where(amax > 0, tl.math.div_rn(amax, tl.full((GROUPS,), 448.0, tl.float32)), 1.0)
    q = tl.math.div_rn(x, tl.broadcast_to(s[:, None], (GROUPS, GROUP)))
    q = _e4m3_grid(tl.clamp(q, -448.0, 448.0))
    tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row * stride_sm + g * stride_sg, s, mask=g < num_groups)


def fp8_quantize_act_triton(x: torch.Tensor, group: int = 128,
                            k_major_scales: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`vlmdeploy.kernels.quant_reference.fp8_quantize_act`; x (M, K) →
    (fp8 (M, K), float32 scales (M, ceil(K / group))). With ``k_major_scales`` the scales are a
    transposed view of a (groups, M) buffer (what ``torch._scaled_mm`` wants for 1 × 128
    blocks)."""
    m, k = x.shape
    groups = triton.cdiv(k, group)
    q = torch.empty(m, k, dtype=FP8, device=x.device)
    if k_major_scales:
        s = torch.empty(groups, m, dtype=torch.float32, device=x.device).t()
    else:
        s = torch.empty(m, groups, dtype=torch.float32, device=x.device)
    if m == 0:
        return q, s
    x = x if x.stride(-1) == 1 else x.contiguous()
    per_program = min(ACT_GROUPS, triton.next_power_of_2(groups))
    grid = (m, triton.cdiv(groups, per_program))
    _act_quant_kernel[grid](x, q, s, k, groups, x.stride(0), q.stride(0), s.stride(0),
                            s.stride(1), GROUP=group, GROUPS=per_program, num_warps=4)
    return q, s


@triton.jit
def _fp8_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, bias_ptr, M, N, K,
                     stride_am, stride_asm, stride_ask, stride_bn, stride_bsn, stride_bsk,
                     stride_cm, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     SCALE_N: tl.constexpr, GROUP_M: tl.constexpr):
    # grouped program order: GROUP_M row tiles share each weight tile while it is in L2
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    width = GROUP_M * tiles_n
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows
    pid_n = (pid % width) // rows
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask, n_mask = rm < M, rn < N
    a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * stride_am + rk[None, :]
    b_ptrs = b_ptr + rn.to(tl.int64)[None, :] * stride_bn + rk[:, None]  # (BLOCK_K, BLOCK_N)
    as_ptrs = as_ptr + rm * stride_asm
    bs_ptr = bs_ptr + (pid_n * BLOCK_N // SCALE_N) * stride_bsn  # the tile's weight block row
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = rk < K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        a_s = tl.load(as_ptrs + kb * stride_ask, mask=m_mask, other=0.0)  # (BLOCK_M,)
        b_s = tl.load(bs_ptr + kb * stride_bsk)
        if UPCAST:  # no fp8 tensor cores (Triton's interpreter): fp8 values are exact in fp16
            part = tl.dot(a.to(tl.float16), b.to(tl.float16))
        else:
            part = tl.dot(a, b)
        acc += part * (a_s[:, None] * b_s)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    c = acc.to(c_ptr.dtype.element_ty)
    tl.store(c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :], c,
             mask=m_mask[:, None] & n_mask[None, :])


def choose_gemm_config(m: int, n: int, sms: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for an (m, n) output. Few rows: narrow N tiles,
    so that enough programs stream the weight (about one per multiprocessor); many rows: 128 ×
    128 tiles. Not tuned yet: ``benchmarks/quant_gemm.py`` measures it against cuBLAS."""
    block_m = min(128, max(16, triton.next_power_of_2(m)))
    if block_m < 128:
        block_n = next((b for b in (128, 64) if triton.cdiv(n, b) >= sms), 32)
        return block_m, block_n, 4, 4
    return 128, 128, 8, 3


def fp8_gemm_triton(xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor,
                    weight_scale_inv: torch.Tensor, out_dtype: torch.dtype,
                    bias: torch.Tensor | None = None,
                    config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """The GEMM of quantised activations xq (M, K) with scales xs (M, K / 128) (any strides) and
    the blocked weight (N, K) → (M, N) in ``out_dtype``."""
    m, k = xq.shape
    n = weight.shape[0]
    out = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    if m == 0 or n == 0:
        return out
    block_m, block_n, warps, stages = config or choose_gemm_config(
        m, n, multiprocessors(xq.device))
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _fp8_gemm_kernel[grid](
        xq, xs, weight, weight_scale_inv, out, bias if bias is not None else out, m, n, k,
        xq.stride(0), xs.stride(0), xs.stride(1), weight.stride(0), weight_scale_inv.stride(0),
        weight_scale_inv.stride(1), out.stride(0), HAS_BIAS=bias is not None,
        UPCAST=not xq.is_cuda, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=128, SCALE_N=128,
        GROUP_M=8, num_warps=warps, num_stages=stages)
    return out


def fp8_gemm_scaled_mm(xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor,
                       weight_scale_inv: torch.Tensor, out_dtype: torch.dtype,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same GEMM through cuBLAS (``torch._scaled_mm``, blockwise 1 × 128 by 128 × 128): xs
    must be K-block-major (:func:`fp8_quantize_act_triton`'s default), the weight's scales are
    passed transposed, the weight as its column-major transpose."""
    y = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=weight_scale_inv.t(),
                         out_dtype=out_dtype)
    return y if bias is None else y + bias.to(out_dtype)


def scaled_mm_applies(k: int, n: int, block: tuple[int, int]) -> bool:
    """Whether cuBLAS's blockwise FP8 GEMM takes these shapes: 128 × 128 blocks, whole blocks
    along K, and N a multiple of 16 (its tensor layout rules)."""
    return tuple(block) == (128, 128) and k % 128 == 0 and n % 16 == 0


@functools.cache
def _check_device(device: torch.device) -> None:
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise RuntimeError(
            "FP8 weights need FP8 tensor cores: a GPU of compute capability 8.9 or newer "
            f"(Ada, Hopper); {torch.cuda.get_device_name(device)} has "
            f"{torch.cuda.get_device_capability(device)}")


def fp8_linear_triton(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                      block: tuple[int, int] = (128, 128),
                      bias: torch.Tensor | None = None,
                      backend: str | None = None) -> torch.Tensor:
    """Triton twin of :func:`vlmdeploy.kernels.quant_reference.fp8_linear`. ``backend``:
    ``"triton"`` or ``"scaled_mm"`` (default: ``VLMDEPLOY_FP8_GEMM``); ``scaled_mm`` falls back
    to Triton for shapes cuBLAS does not take."""
    if tuple(block) != (128, 128):
        raise ValueError(f"the FP8 GEMM takes 128 x 128 weight blocks, not {tuple(block)}")
    _check_device(x.device)
    lead, k = x.shape[:-1], x.shape[-1]
    n = weight.shape[0]
    backend = backend or env.fp8_gemm_backend()
    cublas = backend == "scaled_mm" and x.is_cuda and scaled_mm_applies(k, n, block)
    xq, xs = fp8_quantize_act_triton(x.reshape(-1, k), block[1], k_major_scales=cublas)
    gemm = fp8_gemm_scaled_mm if cublas else fp8_gemm_triton
    return gemm(xq, xs, weight, weight_scale_inv, x.dtype, bias).reshape(*lead, n)
