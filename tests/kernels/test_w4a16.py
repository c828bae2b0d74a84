"""The W4A16 kernels (GEMV for one row, GEMM for more) against quant_reference.w4a16_linear over
dtypes, group sizes, widths that are not a multiple of the tile, every nibble value of weights and
zero points; on the GPU at the 8B's shapes."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from vlmdeploy.kernels import quant_reference as ref  # noqa: E402
from vlmdeploy.kernels.w4a16_kernel import w4a16_linear_triton  # noqa: E402

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=4e-2, rtol=2e-2),
       torch.float16: dict(atol=4e-3, rtol=2e-3)}


def operands(m, n, k, group, dtype, device, seed=0):
    """Random words (every nibble value of weights and zero points occurs) and scales."""
    gen = torch.Generator().manual_seed(seed)
    qweight = torch.randint(-2**31, 2**31 - 1, (k, n // 8), generator=gen, dtype=torch.int32)
    qzeros = torch.randint(-2**31, 2**31 - 1, (k // group, n // 8), generator=gen,
                           dtype=torch.int32)
    scales = (torch.rand(k // group, n, generator=gen) * 0.01 + 1e-3).half()
    x = torch.randn(m, k, generator=gen).to(dtype)
    return [t.to(device) for t in (x, qweight, qzeros, scales)]


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("m,n,k,group", [(1, 64, 128, 128), (1, 200, 256, 64), (3, 200, 256, 128),
                                         (33, 136, 384, 128), (2, 8, 64, 32)])
def test_w4a16_equals_the_reference(m, n, k, group, dtype, device):
    x, qweight, qzeros, scales = operands(m, n, k, group, dtype, device, seed=n + m)
    out = w4a16_linear_triton(x, qweight, qzeros, scales, group)
    expected = ref.w4a16_linear(x.cpu(), qweight.cpu(), qzeros.cpu(), scales.cpu(), group)
    assert out.shape == (m, n) and out.dtype == dtype
    torch.testing.assert_close(out.cpu(), expected, **TOL[dtype])


@pytest.mark.parametrize("config", [(1, 32, 32, 4), (1, 128, 64, 4), (16, 32, 32, 4),
                                    (32, 64, 64, 4)])
def test_w4a16_configs_bias_and_leading_dims(config, device):
    """The GEMV forced on several rows (it takes them one by one), and GEMM tiles, with a bias."""
    x, qweight, qzeros, scales = operands(6, 80, 256, 128, torch.float32, device, seed=9)
    bias = torch.randn(80, device=device)
    out = w4a16_linear_triton(x.view(2, 3, 256), qweight, qzeros, scales, 128, bias=bias,
                              config=config)
    expected = ref.w4a16_linear(x.cpu(), qweight.cpu(), qzeros.cpu(), scales.cpu(), 128,
                                bias=bias.cpu())
    torch.testing.assert_close(out.cpu().view(6, 80), expected, **TOL[torch.float32])


def test_w4a16_refuses_mismatched_inputs(device):
    x, qweight, qzeros, scales = operands(2, 16, 128, 64, torch.float32, device)
    with pytest.raises(ValueError, match="features"):
        w4a16_linear_triton(x[:, :64], qweight, qzeros, scales, 64)
    with pytest.raises(ValueError, match="BLOCK_K"):
        w4a16_linear_triton(x, qweight, qzeros, scales, 64, config=(16, 32, 48, 4))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 16, 64, 300, 2048])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (24576, 4096), (4096, 12288)])
def test_w4a16_at_8b_shapes_on_the_gpu(dtype, m, n, k):
    x, qweight, qzeros, scales = operands(m, n, k, 128, dtype, torch.device("cuda"), seed=m)
    x = x / 8
    out = w4a16_linear_triton(x, qweight, qzeros, scales, 128)
    expected = ref.w4a16_linear(x.float(), qweight, qzeros, scales, 128)
    err = ((out.float() - expected).norm() / expected.norm()).item()
    assert err < 1e-2, err
