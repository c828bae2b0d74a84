"""scaled_add_norm_triton against reference.scaled_add_norm: LayerNorm and RMSNorm, with and
without the residual update and the bias, odd widths, strided rows."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from vlmdeploy.kernels import reference  # noqa: E402
from vlmdeploy.kernels.scaled_add_norm_kernel import scaled_add_norm_triton  # noqa: E402

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
       torch.float16: dict(atol=2e-3, rtol=2e-3)}
DTYPES = list(TOL)


def _inputs(shape, dtype, device, with_y, with_bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = shape[-1]
    x = (torch.randn(shape, generator=gen) * 3 + 1).to(dtype).to(device)
    y = torch.randn(shape, generator=gen).to(dtype).to(device) if with_y else None
    s = (0.1 * torch.randn(n, generator=gen)).to(dtype).to(device) if with_y else None
    w = (1 + 0.5 * torch.randn(n, generator=gen)).to(dtype).to(device)
    b = torch.randn(n, generator=gen).to(dtype).to(device) if with_bias else None
    return x, y, s, w, b


def _check(x, y, s, w, b, rms):
    eps = 1e-6
    h, out = scaled_add_norm_triton(x, y, s, w, b, eps, rms)
    ref_h, ref_out = reference.scaled_add_norm(x, y, s, w, b, eps, rms)
    assert out.dtype == ref_out.dtype and out.shape == ref_out.shape
    assert h.dtype == ref_h.dtype and h.shape == ref_h.shape
    torch.testing.assert_close(h, ref_h, **TOL[x.dtype])
    torch.testing.assert_close(out, ref_out, **TOL[x.dtype])
    if y is None:
        assert h is x  # without an update the stream is passed through, not copied


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 16), (7, 100), (2, 3, 64)])
@pytest.mark.parametrize("with_y", [False, True])
@pytest.mark.parametrize("rms", [False, True])
def test_scaled_add_norm_interpreter(shape, dtype, with_y, rms, device):
    _check(*_inputs(shape, dtype, device, with_y, with_bias=not rms), rms)


def test_scaled_add_norm_layer_norm_without_bias(device):
    _check(*_inputs((5, 48), torch.float32, device, True, with_bias=False), rms=False)


def test_scaled_add_norm_strided_rows(device):
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(9, 96, generator=gen).to(device)
    x, y = base[:, :40], base[:, 48:88]  # rows with a stride of 96, unit column stride
    w, b, s = (torch.randn(40, generator=gen).to(device) for _ in range(3))
    _check(x, y, s, w, b, rms=False)


def test_scaled_add_norm_mixed_dtypes_take_the_reference(device):
    x, y, s, w, b = _inputs((3, 32), torch.bfloat16, device, True, True)
    s, w, b = s.float(), w.float(), b.float()  # bf16 activations, fp32 scale and norm
    h, out = scaled_add_norm_triton(x, y, s, w, b, 1e-6)
    ref_h, ref_out = reference.scaled_add_norm(x, y, s, w, b, 1e-6)
    assert h.dtype == ref_h.dtype == torch.float32
    torch.testing.assert_close(h, ref_h, atol=0, rtol=0)
    torch.testing.assert_close(out, ref_out, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 1025, 1024), (3, 1025, 3200), (1, 256, 4096)])
@pytest.mark.parametrize("rms", [False, True])
def test_scaled_add_norm_gpu(shape, dtype, rms):
    for with_y in (False, True):
        _check(*_inputs(shape, dtype, "cuda", with_y, with_bias=not rms, seed=3), rms)
