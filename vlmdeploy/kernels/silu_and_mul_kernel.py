"""SwiGLU on a fused gate-up projection: ``silu(x[..., :d]) * x[..., d:]`` in one pass.

Same contract as :func:`vlmdeploy.kernels.reference.silu_and_mul`. Like the reference, the SiLU
result is rounded to the input dtype before the product. Rows may be strided; the last dimension
must be contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, d, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0)
    act = (gate / (1.0 + tl.exp(-gate))).to(up.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (act * up.to(tl.float32)).to(up.dtype), mask=mask)


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    """Triton twin of :func:`vlmdeploy.kernels.reference.silu_and_mul`; x (..., 2d) -> (..., d)."""
    d = x.shape[-1] // 2
    out = torch.empty(*x.shape[:-1], d, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    x2 = x.reshape(-1, 2 * d)  # (M, 2d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    o2 = out.view(-1, d)
    grid = (x2.shape[0], triton.cdiv(d, _BLOCK))
    _silu_and_mul_kernel[grid](x2, o2, x2.stride(0), o2.stride(0), d, BLOCK=_BLOCK, num_warps=4)
    return out
