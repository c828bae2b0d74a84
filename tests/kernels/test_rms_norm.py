"""rms_norm_triton against reference.rms_norm: odd widths, strided rows, with and without a
residual.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from vlmdeploy.kernels import reference  # noqa: E402
from vlmdeploy.kernels.rms_norm_kernel import rms_norm_triton  # noqa: E402

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
       torch.float16: dict(atol=2e-3, rtol=2e-3)}
DTYPES = list(TOL)


def _check(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor | None) -> None:
    eps = 1e-6
    out, res = rms_norm_triton(x, w, eps, residual)
    ref_out, ref_res = reference.rms_norm(x, w, eps, residual)
    assert out.dtype == ref_out.dtype and out.shape == ref_out.shape
    torch.testing.assert_close(out, ref_out, **TOL[x.dtype])
    if residual is None:
        assert res is None
    else:
        # the residual sum is one rounding of an exact add: it must match bit for bit, except in
        # Triton's interpreter, whose fp32 -> bf16 cast truncates instead of rounding to nearest
        exact = x.is_cuda or x.dtype != torch.bfloat16
        tol = dict(atol=0, rtol=0) if exact else TOL[x.dtype]
        torch.testing.assert_close(res, ref_res, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 16), (7, 100), (33, 256), (2, 3, 64)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_interpreter(shape, dtype, with_residual, device):
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype).to(device)
    w = (1 + 0.5 * torch.randn(shape[-1], generator=gen)).to(dtype).to(device)
    r = torch.randn(shape, generator=gen).to(dtype).to(device) if with_residual else None
    _check(x, w, r)


def test_rms_norm_strided_rows(device):
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(9, 96, generator=gen).to(device)
    x, r = base[:, :40], base[:, 48:88]  # rows with a stride of 96, unit column stride
    _check(x, torch.randn(40, generator=gen).to(device), r)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 255, 2676])
@pytest.mark.parametrize("hidden", [1024, 4096, 3200])
def test_rms_norm_gpu(tokens, hidden, dtype):
    x = torch.randn(tokens, hidden, device="cuda").to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(dtype)
    r = torch.randn(tokens, hidden, device="cuda").to(dtype)
    _check(x, w, None)
    _check(x, w, r)
