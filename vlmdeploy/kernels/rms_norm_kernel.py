"""Fused RMSNorm (optionally after a residual add) in one pass over each row.

Same contract as :func:`vlmdeploy.kernels.reference.rms_norm`: ``(norm(x + residual) * weight, x +
residual)`` with fp32 statistics. The intermediate roundings of the reference (the sum in the
activations' dtype, the normalised row in that dtype before the weight) are reproduced so that bf16
results match it bit for bit up to the order of the sum of squares. Rows may be strided; the last
dimension must be contiguous (else it is copied).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import pdl_args, pdl_enabled, pdl_wait


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, res_out_ptr,
                     stride_x, stride_r, stride_out, stride_res, n_cols, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
        # the reference adds in the activations' dtype, so round the sum before normalising it
        x = (x.to(tl.float32) + r.to(tl.float32)).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_res + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    normed = (xf * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    out = (normed * w).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_out + cols, out, mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D (rows, cols) view with a unit column stride, copying only when unavoidable."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float,
                    residual: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton twin of :func:`vlmdeploy.kernels.reference.rms_norm`; x and residual (..., N), weight
    (N,).
    """
    n = x.shape[-1]
    sum_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = torch.empty(x.shape, dtype=torch.promote_types(sum_dtype, weight.dtype), device=x.device)
    res_out = None if residual is None else torch.empty(x.shape, dtype=sum_dtype, device=x.device)
    if x.numel() == 0:
        return out, res_out
    x2 = _rows(x)  # (M, N)
    r2 = _rows(residual) if residual is not None else x2
    o2, ro2 = out.view(-1, n), (res_out.view(-1, n) if res_out is not None else out.view(-1, n))
    block = triton.next_power_of_2(n)
    num_warps = min(max(block // 512, 1), 16)  # 16-byte accesses: 8 bf16 values per thread per pass
    _rms_norm_kernel[(x2.shape[0],)](
        x2, r2, weight.contiguous(), o2, ro2,
        x2.stride(0), r2.stride(0), o2.stride(0), ro2.stride(0), n, eps,
        HAS_RESIDUAL=residual is not None, BLOCK_N=block, num_warps=num_warps,
        **pdl_args(pdl_enabled(x.device)))
    return out, res_out
