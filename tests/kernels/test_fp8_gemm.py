"""The blocked-FP8 kernels against quant_reference: the activation quantisation bit for bit (both
scale layouts, strided rows, partial groups), the GEMM over odd shapes, partial blocks and a bias;
on the GPU at the 8B's shapes through both GEMMs (Triton's and cuBLAS's ``_scaled_mm``)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from vlmdeploy.kernels import quant_reference as ref  # noqa: E402
from vlmdeploy.kernels.fp8_gemm_kernel import (  # noqa: E402
    fp8_gemm_triton,
    fp8_linear_triton,
    fp8_quantize_act_triton,
)

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=2e-2),
       torch.float16: dict(atol=4e-3, rtol=2e-3)}


def operands(m, n, k, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen) * 4).to(dtype)
    w = torch.randn(n, k, generator=gen) * 0.05
    w[:, :64] *= 20  # one block column much larger than the rest
    q, s = ref.fp8_quantize_blocks(w)
    return x.to(device), q.to(device), s.to(device)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("m,k", [(1, 128), (3, 300), (17, 1000)])
@pytest.mark.parametrize("k_major", [False, True])
def test_activation_quantisation_equals_the_reference(m, k, dtype, k_major, device):
    x, _, _ = operands(m, 8, k, dtype, device, seed=m)
    x[0, 0] = 0.0
    if m > 2:
        x[2] = 0.0  # an all-zero row: scale 1, zeros
    q, s = fp8_quantize_act_triton(x, 128, k_major_scales=k_major)
    rq, rs = ref.fp8_quantize_act(x.cpu())
    assert q.dtype == torch.float8_e4m3fn and s.shape == rs.shape
    assert torch.equal(q.cpu().float(), rq.float()) and torch.equal(s.cpu(), rs)
    assert (s.t() if k_major else s).is_contiguous()


def test_activation_quantisation_rounds_as_torch_at_the_edges(device):
    """One group whose scale is 1 (its largest value is 448): values that round up into the next
    binade (Triton's interpreter once made 124.3 into 64), ties (to even), subnormals."""
    edge = [448.0, 124.3, 127.99, 124.0, -60.5, 15.5, 0.0029, 2.0**-10, 3 * 2.0**-10, -2.0**-7,
            1e-30, 239.9, 232.0, 247.99]
    x = torch.zeros(1, 128)
    x[0, :len(edge)] = torch.tensor(edge)
    q, s = fp8_quantize_act_triton(x.to(device), k_major_scales=False)
    assert s.item() == 1.0
    assert torch.equal(q.cpu().float(), x.to(torch.float8_e4m3fn).float())


def test_activation_quantisation_of_strided_rows(device):
    wide = torch.randn(4, 512, device=device)
    q, s = fp8_quantize_act_triton(wide[:, :256])  # rows 512 apart
    rq, rs = ref.fp8_quantize_act(wide[:, :256].cpu())
    assert torch.equal(q.cpu().float(), rq.float()) and torch.equal(s.cpu(), rs)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("m,n,k", [(1, 64, 128), (5, 200, 300), (33, 256, 256), (2, 136, 520)])
def test_fp8_linear_equals_the_reference(m, n, k, dtype, device):
    x, q, s = operands(m, n, k, dtype, device, seed=n)
    out = fp8_linear_triton(x, q, s, backend="triton")
    expected = ref.fp8_linear(x.cpu(), q.cpu(), s.cpu())
    assert out.shape == (m, n) and out.dtype == dtype
    torch.testing.assert_close(out.cpu(), expected, **TOL[dtype])


@pytest.mark.parametrize("config", [(16, 32, 4, 1), (32, 64, 4, 2), (16, 128, 4, 1)])
def test_fp8_gemm_configs_and_bias(config, device):
    """Every N tile width that divides the 128-row weight block, with a bias and leading dims."""
    x, q, s = operands(40, 264, 384, torch.float32, device, seed=5)
    bias = torch.randn(264, device=device)
    xq, xs = fp8_quantize_act_triton(x)
    out = fp8_gemm_triton(xq, xs, q, s, torch.float32, bias=bias, config=config)
    torch.testing.assert_close(out.cpu(), ref.fp8_linear(x.cpu(), q.cpu(), s.cpu(),
                                                         bias=bias.cpu()), **TOL[torch.float32])
    x3 = x.view(4, 10, 384)
    torch.testing.assert_close(fp8_linear_triton(x3, q, s).cpu(),
                               ref.fp8_linear(x3.cpu(), q.cpu(), s.cpu()), **TOL[torch.float32])


def test_fp8_linear_refuses_other_blocks_and_takes_no_rows(device):
    x, q, s = operands(2, 64, 128, torch.float32, device)
    with pytest.raises(ValueError, match="128 x 128"):
        fp8_linear_triton(x, q, s, block=(64, 64))
    assert fp8_linear_triton(x[:0], q, s).shape == (0, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "scaled_mm"])
@pytest.mark.parametrize("m", [1, 7, 16, 64, 300, 2048])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (24576, 4096), (4096, 12288)])
def test_fp8_linear_at_8b_shapes_on_the_gpu(backend, m, n, k):
    if backend == "scaled_mm" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("cuBLAS's blockwise FP8 GEMM needs Hopper")
    x, q, s = operands(m, n, k, torch.bfloat16, torch.device("cuda"), seed=m)
    out = fp8_linear_triton(x, q, s, backend=backend)
    expected = ref.fp8_linear(x.float(), q, s)  # on the GPU: fp32 GEMM of the dequantised
    err = ((out.float() - expected).norm() / expected.norm()).item()
    assert err < 1e-2, err  # bf16 output rounding is 2^-9; fp32 sums in another order


def test_the_gemm_backend_switch(device, monkeypatch):
    x, q, s = operands(3, 64, 256, torch.float32, device, seed=7)
    expected = ref.fp8_linear(x.cpu(), q.cpu(), s.cpu())
    monkeypatch.setenv("VLMDEPLOY_FP8_GEMM", "scaled_mm")  # Triton where cuBLAS does not apply
    torch.testing.assert_close(fp8_linear_triton(x, q, s).cpu(), expected, atol=1e-3, rtol=1e-3)
    monkeypatch.setenv("VLMDEPLOY_FP8_GEMM", "cutlass")
    with pytest.raises(ValueError, match="VLMDEPLOY_FP8_GEMM='cutlass'"):
        fp8_linear_triton(x, q, s)
