"""decode_attention against reference.paged_attention: ragged contexts over shuffled pages, GQA
groups 1..8, forced and heuristic split-K (including more splits than a context has tiles), idle
sequences (q_len 0).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from vlmdeploy.kernels import reference  # noqa: E402
from vlmdeploy.kernels.decode_attention import decode_attention  # noqa: E402

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=5e-3, rtol=5e-3)}
DTYPES = list(TOL)


def _check(batch: dict, num_splits: int | None = None, max_kv_len: int | None = None) -> None:
    out = decode_attention(**batch, max_kv_len=max_kv_len, num_splits=num_splits)
    ref = reference.paged_attention(**batch)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, **TOL[ref.dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_q,n_kv", [(2, 2), (6, 2), (8, 1)])
@pytest.mark.parametrize("num_splits", [None, 1, 3, 7])
def test_decode_interpreter(n_q, n_kv, num_splits, dtype, device, paged_batch):
    kv_lens = [1, 37, 100, 16, 64]
    batch = paged_batch([1] * 5, kv_lens, n_q, n_kv, 16, 16, dtype, device, seed=n_q + n_kv)
    _check(batch, num_splits)


def test_decode_idle_sequence_and_big_pages(device, paged_batch):
    """A sequence with no new token in the batch is skipped; 32-token pages; hint given."""
    batch = paged_batch([1, 0, 1, 1], [45, 9, 1, 70], 4, 2, 16, 32, torch.float32, device, seed=9)
    _check(batch, num_splits=2, max_kv_len=70)
    _check(batch, max_kv_len=70)


GPU_CASES = [  # (batch, n_q, n_kv, head_dim, page, longest context)
    (1, 32, 8, 128, 64, 4096),
    (7, 8, 8, 64, 16, 3000),
    (64, 32, 4, 128, 32, 2000),
    (33, 16, 2, 128, 16, 1000),
    (5, 12, 4, 64, 64, 5000),
]


def random_decode_batch(B, n_q, n_kv, D, page, max_len, dtype, device, paged_batch) -> dict:
    """B one-token sequences of random context lengths, the first one max_len long."""
    gen = torch.Generator().manual_seed(B)
    kv_lens = torch.randint(1, max_len + 1, (B,), generator=gen).tolist()
    kv_lens[0] = max_len
    return paged_batch([1] * B, kv_lens, n_q, n_kv, D, page, dtype, device, seed=B)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,n_q,n_kv,D,page,max_len", GPU_CASES)
def test_decode_gpu(B, n_q, n_kv, D, page, max_len, dtype, paged_batch):
    batch = random_decode_batch(B, n_q, n_kv, D, page, max_len, dtype, torch.device("cuda"),
                                paged_batch)
    _check(batch, max_kv_len=max_len)
    _check(batch, num_splits=5)
    _check(batch, num_splits=64)  # more splits than most contexts have tiles: empty splits merge


def _check_norm_rope(batch: dict, num_splits: int | None = None, skip_slot: int | None = None,
                     weight_dtype: torch.dtype | None = None, fuse: bool | None = True) -> None:
    """Raw q/k/v (slices of one fused projection) through the fused decode launch against the
    reference's store-then-attend: the output and every slot of both caches (the cache is NaN
    wherever no token was written, so a stray store shows). Each sequence's new token is its last
    position; ``skip_slot`` gives one of them slot -1 (not stored: its cached value is read).
    ``fuse`` True runs the fused kernel whatever the split count, None lets the launcher choose."""
    q0, k_cache, v_cache = batch["q"], batch["k_cache"], batch["v_cache"]
    T, n_q, D = q0.shape
    n_kv, page, dev, dtype = k_cache.shape[2], k_cache.shape[1], q0.device, q0.dtype
    gen = torch.Generator().manual_seed(T * 7 + n_q)
    qkv = (torch.randn(T, (n_q + 2 * n_kv) * D, generator=gen) * 2).to(dtype).to(dev)
    q = qkv[:, :n_q * D].view(T, n_q, D)
    k = qkv[:, n_q * D:(n_q + n_kv) * D].view(T, n_kv, D)
    v = qkv[:, (n_q + n_kv) * D:].view(T, n_kv, D)
    wd = weight_dtype or dtype
    qw = (1 + 0.3 * torch.randn(D, generator=gen)).to(wd).to(dev)
    kw = (1 + 0.3 * torch.randn(D, generator=gen)).to(wd).to(dev)
    cu, kv_lens, tables = batch["cu_seqlens_q"].cpu(), batch["kv_lens"].cpu(), batch["block_tables"]
    rows = [b for b in range(len(kv_lens)) if cu[b + 1] > cu[b]]  # sequences with a new token
    last = kv_lens[rows].long() - 1
    slots = tables.cpu()[rows, last // page].long() * page + last % page
    if skip_slot is not None:
        slots[skip_slot] = -1
    slots = slots.to(dev)
    cos, sin = reference.rope_cos_sin(last.to(dev), D, 1e6, wd)
    fused_caches = (k_cache.clone(), v_cache.clone())
    args = (q, k, v, qw, kw, cos, sin, 1e-6)
    out = decode_attention(q, *fused_caches, batch["cu_seqlens_q"], batch["kv_lens"], tables,
                           batch["scale"], num_splits=num_splits,
                           norm_rope=(*args[1:], slots), fuse=fuse)
    ref = reference.paged_attention_norm_rope(*args, k_cache, v_cache, slots, batch["cu_seqlens_q"],
                                              batch["kv_lens"], tables, batch["scale"])
    assert out.dtype == ref.dtype
    tol = TOL[torch.bfloat16] if torch.bfloat16 in (dtype, ref.dtype) else TOL[ref.dtype]
    if dtype == torch.bfloat16:  # rotated values reach ~8: one bf16 step of a RoPE term is 2^-5
        tol = dict(atol=1.25e-1, rtol=3.2e-2)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(fused_caches[0], k_cache, equal_nan=True, **tol)
    torch.testing.assert_close(fused_caches[1], v_cache, equal_nan=True, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_q,n_kv", [(2, 2), (6, 2), (8, 1)])
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_decode_norm_rope_interpreter(n_q, n_kv, num_splits, dtype, device, paged_batch):
    batch = paged_batch([1] * 5, [1, 37, 100, 16, 64], n_q, n_kv, 16, 16, dtype, device,
                        seed=n_q * n_kv)
    _check_norm_rope(batch, num_splits)


def test_decode_norm_rope_idle_skipped_and_fp32_weights(device, paged_batch):
    """An idle sequence (no new token) stores nothing; a slot of -1 stores nothing and attends over
    the cached value; fp32 weights over bf16 activations rotate q to fp32, as the reference does."""
    batch = paged_batch([1, 0, 1, 1], [45, 9, 1, 70], 4, 2, 16, 32, torch.bfloat16, device, seed=3)
    _check_norm_rope(batch, num_splits=2, skip_slot=2)
    _check_norm_rope(batch, weight_dtype=torch.float32)


@pytest.mark.parametrize("fuse", [None, False])
def test_decode_norm_rope_launcher_choice(fuse, device, paged_batch):
    """The separate norm-and-store launch (chosen for few splits, or forced) gives the same."""
    batch = paged_batch([1] * 3, [5, 80, 33], 4, 2, 16, 16, torch.float16, device, seed=4)
    _check_norm_rope(batch, fuse=fuse)
    _check_norm_rope(batch, num_splits=8, fuse=fuse)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,n_q,n_kv,D,page,max_len", GPU_CASES)
def test_decode_norm_rope_gpu(B, n_q, n_kv, D, page, max_len, dtype, paged_batch):
    batch = random_decode_batch(B, n_q, n_kv, D, page, max_len, dtype, torch.device("cuda"),
                                paged_batch)
    _check_norm_rope(batch)
    _check_norm_rope(batch, num_splits=64, skip_slot=B - 1)
    _check_norm_rope(batch, fuse=None)
