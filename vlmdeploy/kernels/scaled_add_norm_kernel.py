"""A residual update with a layer scale fused with the norm after it, one pass over each row.

Same contract as :func:`vlmdeploy.kernels.reference.scaled_add_norm`: ``h = x + y * scale`` rounded
once to the activations' dtype (as ``torch.addcmul``), then LayerNorm (or RMSNorm) of the rounded
``h`` with fp32 statistics. The vision encoder's layers end in exactly this pair (``x + attn·ls1``
then ``norm2``, ``h + mlp·ls2`` then the next layer's ``norm1``); as two PyTorch kernels the row is
read three times and written twice, here read twice and written twice, and the layer-scale
broadcast no longer keeps the add from using wide loads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import scaled_add_norm


@triton.jit
def _scaled_add_norm_kernel(x_ptr, y_ptr, s_ptr, w_ptr, b_ptr, h_ptr, out_ptr,
                            stride_x, stride_y, stride_h, stride_out, n_cols, eps,
                            HAS_Y: tl.constexpr, HAS_BIAS: tl.constexpr, RMS: tl.constexpr,
                            BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_Y:
        y = tl.load(y_ptr + row * stride_y + cols, mask=mask, other=0.0)
        s = tl.load(s_ptr + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + y.to(tl.float32) * s.to(tl.float32)).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * stride_h + cols, x, mask=mask)
    xf = x.to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if RMS:
        # as reference.rms_norm: the normalised row is rounded before the weight
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
        out = (xf * rstd).to(x.dtype).to(tl.float32) * w
    else:
        mean = tl.sum(xf, axis=0) / n_cols
        xc = tl.where(mask, xf - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(xc * xc, axis=0) / n_cols + eps)
        out = xc * rstd * w
        if HAS_BIAS:
            out += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def scaled_add_norm_triton(x: torch.Tensor, y: torch.Tensor | None, scale: torch.Tensor | None,
                           weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
                           rms: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`vlmdeploy.kernels.reference.scaled_add_norm`; x and y (..., N),
    scale, weight and bias (N,). Mixed dtypes (whose promotions the reference defines) take the
    reference."""
    dtypes = {x.dtype, weight.dtype} | ({y.dtype, scale.dtype} if y is not None else set())
    dtypes |= {bias.dtype} if bias is not None else set()
    if len(dtypes) > 1 or x.shape[-1] == 0:
        return scaled_add_norm(x, y, scale, weight, bias, eps, rms)
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    h = x if y is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0] == 0:
        return h, out
    y2 = x2
    if y is not None:
        y2 = y.reshape(-1, n)
        y2 = y2 if y2.stride(-1) == 1 else y2.contiguous()
    h2, o2 = h.view(-1, n) if y is not None else out.view(-1, n), out.view(-1, n)
    block = triton.next_power_of_2(n)
    _scaled_add_norm_kernel[(x2.shape[0],)](
        x2, y2, scale.contiguous() if y is not None else weight, weight.contiguous(),
        bias.contiguous() if bias is not None else weight, h2, o2,
        x2.stride(0), y2.stride(0), h2.stride(0), o2.stride(0), n, eps,
        HAS_Y=y is not None, HAS_BIAS=bias is not None, RMS=rms, BLOCK_N=block,
        num_warps=min(max(block // 512, 1), 16))  # 16-byte accesses: 8 bf16 values a thread
    return h, out
