"""silu_and_mul_triton against reference.silu_and_mul: odd widths (not a multiple of the tile),
strided rows.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from vlmdeploy.kernels import reference  # noqa: E402
from vlmdeploy.kernels.silu_and_mul_kernel import silu_and_mul_triton  # noqa: E402

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
       torch.float16: dict(atol=2e-3, rtol=2e-3)}
DTYPES = list(TOL)


def _check(x: torch.Tensor) -> None:
    out = silu_and_mul_triton(x)
    ref = reference.silu_and_mul(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, **TOL[x.dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 32), (7, 200), (5, 2 * 1100), (2, 3, 48)])
def test_silu_and_mul_interpreter(shape, dtype, device):
    gen = torch.Generator().manual_seed(3)
    _check((torch.randn(shape, generator=gen) * 4).to(dtype).to(device))


def test_silu_and_mul_strided_rows(device):
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(6, 80, generator=gen).to(device)
    _check(base[:, 8:72])  # rows with a stride of 80


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 255, 2676])
@pytest.mark.parametrize("inter", [12288, 3000])
def test_silu_and_mul_gpu(tokens, inter, dtype):
    _check((torch.randn(tokens, 2 * inter, device="cuda") * 4).to(dtype))
