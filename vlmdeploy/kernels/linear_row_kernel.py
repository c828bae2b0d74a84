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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import pdl_args, pdl_enabled, pdl_wait

# (BLOCK_N, BLOCK_K, num_warps): within 1% of the fastest for each of the 8B's four weight shapes
# on an H100 (benchmarks/linear_row.py, docs/linear_row.md)
_CONFIG = (4, 2048, 4)


@triton.jit
def _input_tile(x_row, nw_ptr, kk, K, rstd, NORM: tl.constexpr, SILU: tl.constexpr):
    """The input row's values at ``kk`` after the fused prologue, as fp32."""
    dt = x_row.dtype.element_ty
    k_mask = kk < K
    if SILU:
        g = tl.load(x_row + kk, mask=k_mask, other=0.0).to(tl.float32)
        u = tl.load(x_row + K + kk, mask=k_mask, other=0.0).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        return (act * u).to(dt).to(tl.float32)
    xv = tl.load(x_row + kk, mask=k_mask, other=0.0).to(tl.float32)
    if NORM:
        nw = tl.load(nw_ptr + kk, mask=k_mask, other=0.0).to(tl.float32)
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
    acc = w.to(tl.float32) * _input_tile(x_row, nw_ptr, rk, K, rstd, NORM, SILU)[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        kk = k0 + rk
        w = tl.load(w_rows + kk[None, :], mask=n_mask[:, None] & (kk < K)[None, :], other=0.0)
        acc += w.to(tl.float32) * _input_tile(x_row, nw_ptr, kk, K, rstd, NORM, SILU)[None, :]
    y = tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty)
    if RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + rn, mask=n_mask, other=0.0)
        y = (y.to(tl.float32) + r.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_out + rn, y, mask=n_mask)


def linear_row_triton(x: torch.Tensor, weight: torch.Tensor,
                      norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
                      silu_mul: bool = False,
                      residual: torch.Tensor | None = None,
                      config: tuple[int, int, int] | None = None,
                      pdl: bool | None = None) -> torch.Tensor:
    """Triton twin of :func:`vlmdeploy.kernels.reference.linear_row`; x (M, K) or (M, 2K) with
    ``silu_mul``, weight (N, K), residual (M, N). Meant for M of one or a few rows: each row
    streams the whole weight. ``config`` overrides ``(BLOCK_N, BLOCK_K, num_warps)``; ``pdl``
    (default: on where the GPU has it) launches it with programmatic dependent launch."""
    if norm_weight is not None and silu_mul:
        raise ValueError("linear_row fuses either the RMSNorm or the SiLU-and-mul, not both")
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
    block_n, block_k, warps = config or _CONFIG
    if pdl is None:
        pdl = pdl_enabled(x.device)
    block_k = min(block_k, triton.next_power_of_2(k))
    grid = (triton.cdiv(n, block_n), m)
    _linear_row_kernel[grid](
        x, weight, out, res, norm_weight if norm_weight is not None else x, n, k,
        x.stride(0), weight.stride(0), out.stride(0), res.stride(0), eps,
        NORM=norm_weight is not None, SILU=silu_mul, RESIDUAL=residual is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, **pdl_args(pdl))
    return out
