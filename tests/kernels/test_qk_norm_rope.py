"""qk_norm_rope_triton against reference.qk_norm_rope: GQA head counts, strided q/k views of a fused
qkv projection, real RoPE tables at scattered positions. qk_norm_rope_store_triton (k and v written
into a paged cache by the same launch) against reference.qk_norm_rope_store.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from vlmdeploy.kernels import reference  # noqa: E402
from vlmdeploy.kernels.qk_norm_rope_kernel import (  # noqa: E402
    qk_norm_rope_store_triton,
    qk_norm_rope_triton,
)

# Rotated values reach ~8; where the two RoPE terms cancel, one rounding step of a term (2^-5 at
# 4..8 in bf16) is the whole error, so the absolute tolerance is two such steps. Triton's
# interpreter truncates fp32 -> bf16 instead of rounding, which can cost a few more.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=6.25e-2, rtol=1.6e-2),
       torch.float16: dict(atol=8e-3, rtol=2e-3)}
INTERPRETER_BF16 = dict(atol=1.25e-1, rtol=3.2e-2)
DTYPES = list(TOL)


def _tol(out: torch.Tensor, bf16_step: bool) -> dict:
    if bf16_step and not out.is_cuda:
        return INTERPRETER_BF16
    return TOL[torch.bfloat16 if bf16_step else out.dtype]


def _inputs(T: int, n_q: int, n_kv: int, D: int, dtype: torch.dtype, device: torch.device,
            seed: int) -> tuple:
    """q and k as slices of one fused (T, (n_q + 2 n_kv) D) projection, as the attention layer makes
    them.
    """
    gen = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(T, (n_q + 2 * n_kv) * D, generator=gen) * 2).to(dtype).to(device)
    q = qkv[:, :n_q * D].view(T, n_q, D)
    k = qkv[:, n_q * D:(n_q + n_kv) * D].view(T, n_kv, D)
    qw = (1 + 0.3 * torch.randn(D, generator=gen)).to(dtype).to(device)
    kw = (1 + 0.3 * torch.randn(D, generator=gen)).to(dtype).to(device)
    positions = torch.randint(0, 40_000, (T,), generator=gen).to(device)
    cos, sin = reference.rope_cos_sin(positions, D, 1e6, dtype)
    return q, k, qw, kw, cos, sin


def _check(args: tuple) -> None:
    q_out, k_out = qk_norm_rope_triton(*args, 1e-6)
    q_ref, k_ref = reference.qk_norm_rope(*args, 1e-6)
    assert q_out.shape == q_ref.shape and k_out.shape == k_ref.shape
    assert q_out.dtype == q_ref.dtype and k_out.dtype == k_ref.dtype
    bf16_step = args[0].dtype == torch.bfloat16  # the normalised head is rounded to bf16
    torch.testing.assert_close(q_out, q_ref, **_tol(q_out, bf16_step))
    torch.testing.assert_close(k_out, k_ref, **_tol(k_out, bf16_step))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,n_q,n_kv,D",
                         [(1, 4, 2, 16), (7, 6, 1, 16), (5, 8, 8, 64), (3, 3, 1, 32)])
def test_qk_norm_rope_interpreter(T, n_q, n_kv, D, dtype, device):
    _check(_inputs(T, n_q, n_kv, D, dtype, device, seed=T * 31 + n_q))


def test_qk_norm_rope_mixed_dtypes(device):
    """fp32 weights and tables over bf16 activations promote the result to fp32, as in the
    reference.
    """
    q, k, qw, kw, cos, sin = _inputs(4, 4, 2, 16, torch.bfloat16, device, seed=5)
    _check((q, k, qw.float(), kw.float(), cos.float(), sin.float()))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,n_q,n_kv,D", [(1, 32, 8, 128), (2676, 32, 8, 128), (257, 16, 4, 64),
                                          (77, 14, 2, 128)])
def test_qk_norm_rope_gpu(T, n_q, n_kv, D, dtype):
    _check(_inputs(T, n_q, n_kv, D, dtype, torch.device("cuda"), seed=T))


def _check_store(T: int, n_q: int, n_kv: int, D: int, dtype: torch.dtype, device: torch.device,
                 page: int, seed: int) -> None:
    """Slots scattered over a NaN-filled cache, one of them -1 (not stored): the written slots
    must match the reference and every other slot must stay NaN."""
    gen = torch.Generator().manual_seed(seed)
    q, k, qw, kw, cos, sin = _inputs(T, n_q, n_kv, D, dtype, device, seed)
    v = (torch.randn(T, n_kv, D, generator=gen)).to(dtype).to(device)
    n_blocks = T // page + 3
    slots = torch.randperm(n_blocks * page, generator=gen)[:T]
    slots[T // 2] = -1
    slots = slots.to(device)
    caches = [torch.full((n_blocks, page, n_kv, D), float("nan"), dtype=dtype, device=device)
              for _ in range(4)]
    q_out = qk_norm_rope_store_triton(q, k, v, qw, kw, cos, sin, 1e-6, caches[0], caches[1],
                                      slots)
    q_ref = reference.qk_norm_rope_store(q, k, v, qw, kw, cos, sin, 1e-6, caches[2], caches[3],
                                         slots)
    bf16_step = dtype == torch.bfloat16
    torch.testing.assert_close(q_out, q_ref, **_tol(q_out, bf16_step))
    torch.testing.assert_close(caches[0], caches[2], equal_nan=True, **_tol(q_out, bf16_step))
    torch.testing.assert_close(caches[1], caches[3], equal_nan=True, atol=0, rtol=0)
    written = int((~caches[1].isnan()).any(-1).any(-1).sum())
    assert written == T - 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,n_q,n_kv,D,page", [(1, 4, 2, 16, 4), (9, 6, 2, 32, 4),
                                               (5, 8, 8, 16, 16)])
def test_qk_norm_rope_store_interpreter(T, n_q, n_kv, D, page, dtype, device):
    _check_store(T, n_q, n_kv, D, dtype, device, page, seed=T + n_q)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,n_q,n_kv,D,page", [(1, 32, 8, 128, 64), (2676, 32, 8, 128, 64),
                                               (77, 14, 2, 128, 16)])
def test_qk_norm_rope_store_gpu(T, n_q, n_kv, D, page, dtype):
    _check_store(T, n_q, n_kv, D, dtype, torch.device("cuda"), page, seed=T)
