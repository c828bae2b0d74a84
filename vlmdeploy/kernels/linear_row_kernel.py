"""A matrix-vector product for one-token decode, with the layer's small ops fused around it.

Same contract as :func:`vlmdeploy.kernels.reference.linear_row`: ``y = x' @ weight.T (+
residual)``, where ``x'`` is ``x``, ``rms_norm(x) * norm_weight`` or ``silu(x[:K]) * x[K:]``.
Each program owns ``BLOCK_N`` output features and streams their weight rows once; with a handful of
rows there is no reuse to gain from tensor cores, so the product is a multiply-add over
``(BLOCK_N, BLOCK_K)`` tiles and one reduction at the end. The input row is tiny and is read (and
normalised or activated) again by every program from L2, which is what lets one kernel replace the
RMSNorm, the SiLU-and-mul and the residual add that would otherwise run between the GEMMs.

Every rounding of the unfused path is reproduced (the normalised row and the SiLU result in the
activations' dtype, the product rounded before the residual add), so only the order of the fp32
sums differs.

From two rows (small-batch decode) a tensor-core kernel reads each weight tile once for all rows;
there the RMSNorm or SiLU-and-mul runs once beforehand, since each of its programs would otherwise
redo it for the whole input (measured: a batch-2 step 10.0 ms against 6.5 through cuBLAS).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_tile import dot_precision, mma
from .device import multiprocessors
from .pdl import pdl_args, pdl_enabled, pdl_wait
from .rms_norm_kernel import rms_norm_triton
from .silu_and_mul_kernel import silu_and_mul_triton

# (BLOCK_N, BLOCK_K, num_warps): within 1% of the fastest for each of the 8B's four weight shapes
# on an H100 (tools/tuning/linear_row.py; results in docs/results.csv)
ROW_CONFIG = (4, 2048, 4)
MAX_DOT_ROWS = 64  # the tensor-core kernel's limit on rows


def choose_dot_config(n: int, sms: int) -> tuple[int, int, int, int]:
    """The tensor-core kernel's (BLOCK_N, BLOCK_K, num_warps, num_stages) for n output features on
    a GPU with ``sms`` multiprocessors: the widest block that still gives about 1.4 programs per
    multiprocessor, over 8,192-element weight tiles. On an H100 this is the fastest measured config
    for each of the 8B's four shapes at 2 to 16 rows (tools/tuning/linear_row.py --rows)."""
    block_n = next((b for b in (64, 32) if n // b >= 1.4 * sms), 16)
    return block_n, 8192 // block_n, 4, 3




@triton.jit
def _input_tile(x_base, nw_ptr, kk, mask, K, rstd, NORM: tl.constexpr, SILU: tl.constexpr):
    """The input row's values at ``x_base + kk`` after the fused prologue, as fp32; ``mask``
    covers the loads."""
    dt = x_base.dtype.element_ty
    if SILU:
        g = tl.load(x_base + kk, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_base + K + kk, mask=mask, other=0.0).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        return (act * u).to(dt).to(tl.float32)
    xv = tl.load(x_base + kk, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        nw = tl.load(nw_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
        xv = ((xv * rstd).to(dt).to(tl.float32) * nw).to(dt).to(tl.float32)
    return xv


@triton.jit
def _linear_row_kernel(x_ptr, w_ptr, out_ptr, res_ptr, nw_ptr, N, K,
                       stride_x, stride_w, stride_out, stride_res, eps,
                       NORM: tl.constexpr, SILU: tl.constexpr, RESIDUAL: tl.constexpr,
                       PDL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    rk = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row * stride_x
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_w
    # The weights do not depend on the kernel before: under PDL the first tile streams in while
    # that kernel finishes, and only the input row waits for it.
    w = tl.load(w_rows + rk[None, :], mask=n_mask[:, None] & (rk < K)[None, :], other=0.0)
    pdl_wait(PDL)
    rstd = 0.0
    if NORM:
        ss = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            xv = tl.load(x_row + k0 + rk, mask=k0 + rk < K, other=0.0).to(tl.float32)
            ss += xv * xv
        rstd = tl.rsqrt(tl.sum(ss, axis=0) / K + eps)
    acc = w.to(tl.float32) * _input_tile(x_row, nw_ptr, rk, rk < K, K, rstd, NORM, SILU)[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        kk = k0 + rk
        w = tl.load(w_rows + kk[None, :], mask=n_mask[:, None] & (kk < K)[None, :], other=0.0)
        acc += w.to(tl.float32) * _input_tile(x_row, nw_ptr, kk, kk < K, K, rstd, NORM,
                                              SILU)[None, :]
    y = tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty)
    if RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + rn, mask=n_mask, other=0.0)
        y = (y.to(tl.float32) + r.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_out + rn, y, mask=n_mask)


@triton.jit
def _linear_rows_kernel(x_ptr, w_ptr, out_ptr, res_ptr, M, N, K,
                        stride_x, stride_w, stride_out, stride_res,
                        RESIDUAL: tl.constexpr, PDL: tl.constexpr, PRECISION: tl.constexpr,
                        UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    """Up to BLOCK_M rows at once on the tensor cores, as ``(W @ x.T).T``: each weight tile is
    read once for every row, and the loads feed ``tl.dot``, which Triton pipelines."""
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    rm = tl.arange(0, BLOCK_M)
    m_mask = rm < M
    rk = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_w
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_x  # (BLOCK_M, 1)
    pdl_wait(PDL)
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        w = tl.load(w_rows + kk[None, :], mask=n_mask[:, None] & (kk < K)[None, :], other=0.0)
        xt = tl.load(x_rows + kk[None, :], mask=m_mask[:, None] & (kk < K)[None, :], other=0.0)
        acc += mma(w, tl.trans(xt), PRECISION, UPCAST)
    out_mask = n_mask[:, None] & m_mask[None, :]
    y = acc.to(out_ptr.dtype.element_ty)  # (BLOCK_N, BLOCK_M): output row m is column m
    if RESIDUAL:
        r = tl.load(res_ptr + rm[None, :] * stride_res + rn[:, None], mask=out_mask, other=0.0)
        y = (y.to(tl.float32) + r.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rm[None, :] * stride_out + rn[:, None], y, mask=out_mask)


def linear_row_triton(x: torch.Tensor, weight: torch.Tensor,
                      norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
                      silu_mul: bool = False,
                      residual: torch.Tensor | None = None,
                      config: tuple[int, int, int] | None = None,
                      pdl: bool | None = None,
                      dot_config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """Triton twin of :func:`vlmdeploy.kernels.reference.linear_row`; x (M, K) or (M, 2K) with
    ``silu_mul``, weight (N, K), residual (M, N). Meant for M of one or a few rows. ``config``
    = ``(BLOCK_N, BLOCK_K, num_warps)`` runs the row kernel (each row streams the whole weight),
    the default at one row, whatever M is; ``pdl``
    (default: on where the GPU has it) launches it with programmatic dependent launch.
    Two rows or more (up to ``MAX_DOT_ROWS``) run the tensor-core kernel, which reads each weight
    tile once for all rows, with :func:`choose_dot_config` unless ``dot_config`` =
    ``(BLOCK_N, BLOCK_K, num_warps, num_stages)`` is given. Its RMSNorm or SiLU-and-mul runs once,
    as a launch of its own: fused, every program would redo it for the whole input."""
    if norm_weight is not None and silu_mul:
        raise ValueError("linear_row fuses either the RMSNorm or the SiLU-and-mul, not both")
    if weight.dtype != x.dtype:  # an FP8 or packed 4-bit weight would be read as numbers
        raise TypeError(f"linear_row takes a weight of the activations' dtype {x.dtype}, not "
                        f"{weight.dtype}: quantised weights run their own GEMM")
    n, k = weight.shape
    m = x.shape[0]
    if x.shape[-1] != (2 * k if silu_mul else k):
        raise ValueError(f"x has {x.shape[-1]} features for a weight of shape "
                         f"{tuple(weight.shape)}")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    res = residual if residual is not None else out
    if res.stride(-1) != 1:
        res = res.contiguous()
    if pdl is None:
        pdl = pdl_enabled(x.device)
    if dot_config is None and m > 1 and config is None:
        dot_config = choose_dot_config(n, multiprocessors(x.device))
    if dot_config is not None:
        if m > MAX_DOT_ROWS:
            raise ValueError(f"the tensor-core linear_row takes at most {MAX_DOT_ROWS} rows, "
                             f"got {m}")
        if norm_weight is not None:
            x = rms_norm_triton(x, norm_weight, eps)[0]
        elif silu_mul:
            x = silu_and_mul_triton(x)
        block_n, block_k, warps, stages = dot_config
        _linear_rows_kernel[(triton.cdiv(n, block_n),)](
            x, weight, out, res, m, n, k, x.stride(0), weight.stride(0), out.stride(0),
            res.stride(0), RESIDUAL=residual is not None,
            PRECISION=dot_precision(x.dtype), UPCAST=not x.is_cuda,
            BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=block_n,
            BLOCK_K=min(block_k, max(16, triton.next_power_of_2(k))),
            num_warps=warps, num_stages=stages, **pdl_args(pdl))
        return out
    block_n, block_k, warps = config or ROW_CONFIG
    block_k = min(block_k, triton.next_power_of_2(k))
    grid = (triton.cdiv(n, block_n), m)
    _linear_row_kernel[grid](
        x, weight, out, res, norm_weight if norm_weight is not None else x, n, k,
        x.stride(0), weight.stride(0), out.stride(0), res.stride(0), eps,
        NORM=norm_weight is not None, SILU=silu_mul, RESIDUAL=residual is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, **pdl_args(pdl))
    return out
