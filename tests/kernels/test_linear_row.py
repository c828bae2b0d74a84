"""linear_row_triton against reference.linear_row: plain, RMSNorm prologue, SiLU-and-mul prologue,
residual epilogue, widths that are not multiples of the blocks."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from vlmdeploy.kernels import reference  # noqa: E402
from vlmdeploy.kernels.linear_row_kernel import choose_dot_config, linear_row_triton  # noqa: E402

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=2e-3, rtol=2e-3)}


def _inputs(m, n, k, dtype, device, silu=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, 2 * k if silu else k, generator=gen).to(dtype).to(device)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype).to(device)
    nw = (1 + 0.3 * torch.randn(k, generator=gen)).to(dtype).to(device)
    res = torch.randn(m, n, generator=gen).to(dtype).to(device)
    return x, w, nw, res


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("m,n,k", [(1, 24, 64), (1, 37, 100), (3, 40, 256)])
@pytest.mark.parametrize("fuse", ["none", "norm", "silu", "norm+res", "silu+res"])
def test_linear_row_interpreter(m, n, k, dtype, fuse, device):
    silu = fuse.startswith("silu")
    x, w, nw, res = _inputs(m, n, k, dtype, device, silu=silu)
    kwargs = dict(norm_weight=nw if fuse.startswith("norm") else None, eps=1e-6, silu_mul=silu,
                  residual=res if fuse.endswith("+res") else None)
    out = linear_row_triton(x, w, config=(16, 32, 4), **kwargs)
    ref = reference.linear_row(x, w, **kwargs)
    assert out.shape == ref.shape == (m, n) and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("m,n,k", [(1, 24, 64), (3, 40, 100), (17, 16, 48)])
@pytest.mark.parametrize("fuse", ["none", "norm+res", "silu+res"])
def test_linear_rows_tensor_core_interpreter(m, n, k, dtype, fuse, device):
    """The tensor-core variant (several rows per weight read) against the same reference."""
    silu = fuse.startswith("silu")
    x, w, nw, res = _inputs(m, n, k, dtype, device, silu=silu, seed=m)
    kwargs = dict(norm_weight=nw if fuse.startswith("norm") else None, eps=1e-6, silu_mul=silu,
                  residual=res if fuse.endswith("+res") else None)
    out = linear_row_triton(x, w, dot_config=(16, 32, 4, 1), **kwargs)
    # bf16: a sum in another order can land one rounding step (1/32 at 4..8) away before the
    # residual add, and Triton's interpreter truncates fp32 -> bf16 instead of rounding
    tol = dict(atol=6.25e-2, rtol=2e-2) if dtype == torch.bfloat16 else TOL[dtype]
    torch.testing.assert_close(out, reference.linear_row(x, w, **kwargs), **tol)


def test_linear_row_default_config_and_strided_input(device):
    x, w, nw, res = _inputs(2, 20, 48, torch.float32, device, seed=1)
    wide = torch.zeros(2, 96, device=device)
    wide[:, :48] = x  # rows with a stride of 96
    out = linear_row_triton(wide[:, :48], w, norm_weight=nw, residual=res)
    torch.testing.assert_close(out, reference.linear_row(x, w, norm_weight=nw, residual=res),
                               **TOL[torch.float32])


def test_linear_row_rejects_bad_shapes(device):
    x, w, nw, _ = _inputs(1, 8, 32, torch.float32, device)
    with pytest.raises(ValueError, match="features"):
        linear_row_triton(x[:, :16], w)
    with pytest.raises(ValueError, match="either"):
        linear_row_triton(x, w, norm_weight=nw, silu_mul=True)
    with pytest.raises(ValueError, match="either"):
        reference.linear_row(x, w, norm_weight=nw, silu_mul=True)
    with pytest.raises(ValueError, match="64 rows"):
        linear_row_triton(torch.zeros(65, 32, device=device), w, dot_config=(16, 32, 4, 1))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,fuse", [(6144, 4096, "norm"), (4096, 4096, "res"),
                                      (24576, 4096, "norm"), (4096, 12288, "silu+res"),
                                      (1000, 4000, "none")])
@pytest.mark.parametrize("config", [None, (16, 512, 8)])
def test_linear_row_gpu_model_shapes(n, k, fuse, dtype, config, device):
    silu = fuse.startswith("silu")
    x, w, nw, res = _inputs(1, n, k, dtype, device, silu=silu, seed=3)
    kwargs = dict(norm_weight=nw if fuse == "norm" else None, eps=1e-6, silu_mul=silu,
                  residual=res if fuse.endswith("res") else None)
    out = linear_row_triton(x, w, config=config, **kwargs)
    ref = reference.linear_row(x, w, **kwargs)
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("n,k,fuse", [(6144, 4096, "norm"), (4096, 12288, "silu+res"),
                                      (1000, 4000, "none")])
def test_linear_rows_tensor_core_gpu(m, n, k, fuse, device):
    silu = fuse.startswith("silu")
    x, w, nw, res = _inputs(m, n, k, torch.bfloat16, device, silu=silu, seed=m)
    kwargs = dict(norm_weight=nw if fuse == "norm" else None, eps=1e-6, silu_mul=silu,
                  residual=res if fuse.endswith("res") else None)
    out = linear_row_triton(x, w, dot_config=(32, 256, 4, 3), **kwargs)
    torch.testing.assert_close(out, reference.linear_row(x, w, **kwargs), **TOL[torch.bfloat16])


@pytest.mark.parametrize("n,want", [(6144, (32, 256, 4, 3)), (4096, (16, 512, 4, 3)),
                                    (24576, (64, 128, 4, 3))])
def test_dot_config_picks_the_measured_fastest(n, want):
    """On an H100 (132 multiprocessors) the rule gives the fastest config measured at 2-16 rows for
    the 8B's qkv, o_proj / down and gate_up (docs/benchmarks.md)."""
    assert choose_dot_config(n, 132) == want


def test_several_rows_take_the_tensor_core_kernel(device, monkeypatch):
    """Without a config, more than one row runs the tensor-core kernel (after a separate RMSNorm
    launch) and one row the row kernel."""
    from vlmdeploy.kernels import linear_row_kernel as mod

    launched = []
    for name in ("_linear_row_kernel", "_linear_rows_kernel"):
        kernel = getattr(mod, name)

        class Spy:
            def __getitem__(self, grid, name=name, kernel=kernel):
                launched.append(name)
                return kernel[grid]

        monkeypatch.setattr(mod, name, Spy())
    x, w, nw, res = _inputs(3, 40, 64, torch.float32, device)
    torch.testing.assert_close(linear_row_triton(x, w, nw, residual=res),
                               reference.linear_row(x, w, nw, residual=res), **TOL[torch.float32])
    linear_row_triton(x[:1], w)
    assert launched == ["_linear_rows_kernel", "_linear_row_kernel"]
