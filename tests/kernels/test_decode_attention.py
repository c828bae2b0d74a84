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


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,n_q,n_kv,D,page,max_len", GPU_CASES)
def test_decode_gpu(B, n_q, n_kv, D, page, max_len, dtype, paged_batch):
    gen = torch.Generator().manual_seed(B)
    kv_lens = torch.randint(1, max_len + 1, (B,), generator=gen).tolist()
    kv_lens[0] = max_len
    batch = paged_batch([1] * B, kv_lens, n_q, n_kv, D, page, dtype, torch.device("cuda"), seed=B)
    _check(batch, max_kv_len=max_len)
    _check(batch, num_splits=5)
    _check(batch, num_splits=64)  # more splits than most contexts have tiles: empty splits merge
