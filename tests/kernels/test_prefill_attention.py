"""prefill_attention against reference.paged_attention: whole prompts, chunks over a cached prefix,
decode rows mixed in, GQA groups that do not divide the row tile, every page size.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from vlmdeploy.kernels import reference  # noqa: E402
from vlmdeploy.kernels.prefill_attention import prefill_attention  # noqa: E402

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=5e-3, rtol=5e-3)}
DTYPES = list(TOL)


def _check(batch: dict, max_q_len: int | None = None) -> None:
    out = prefill_attention(**batch, max_q_len=max_q_len)
    ref = reference.paged_attention(**batch)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, **TOL[ref.dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_q,n_kv", [(2, 2), (6, 2), (4, 1)])
def test_prefill_interpreter(n_q, n_kv, dtype, device, paged_batch):
    # a decode step, a whole prompt, a chunk after a 23-token prefix, a short chunk, an idle one
    q_lens, kv_lens = [1, 17, 40, 5, 0], [60, 17, 63, 55, 9]
    batch = paged_batch(q_lens, kv_lens, n_q, n_kv, 16, 16, dtype, device, seed=n_q * 7 + n_kv)
    _check(batch, max_q_len=40)


def test_prefill_big_pages_no_hint(device, paged_batch):
    batch = paged_batch([33, 2], [33, 70], 3, 1, 32, 64, torch.float32, device, seed=11)
    _check(batch)


def _ragged(B: int, max_q: int, max_prefix: int, seed: int) -> tuple[list[int], list[int]]:
    gen = torch.Generator().manual_seed(seed)
    q_lens = torch.randint(1, max_q + 1, (B,), generator=gen)
    prefix = torch.randint(0, max_prefix + 1, (B,), generator=gen)
    prefix[0] = 0  # at least one whole prompt
    return q_lens.tolist(), (q_lens + prefix).tolist()


GPU_CASES = [  # (batch, n_q, n_kv, head_dim, page)
    (4, 32, 8, 128, 64),
    (6, 8, 8, 64, 16),
    (3, 16, 2, 128, 32),
    (5, 12, 4, 64, 64),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,n_q,n_kv,D,page", GPU_CASES)
def test_prefill_gpu(B, n_q, n_kv, D, page, dtype, paged_batch):
    q_lens, kv_lens = _ragged(B, 300, 2700, seed=B * D)
    batch = paged_batch(q_lens, kv_lens, n_q, n_kv, D, page, dtype, torch.device("cuda"), seed=B)
    _check(batch, max_q_len=max(q_lens))


@pytest.mark.gpu
def test_prefill_whole_prompt_gpu(paged_batch):
    """The InternVL3.5-8B W2 prompt: 2,676 tokens in one sequence."""
    batch = paged_batch([2676], [2676], 32, 8, 128, 64, torch.bfloat16, torch.device("cuda"))
    _check(batch, max_q_len=2676)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_prefill_decode_gpu(dtype, paged_batch):
    """30 decode steps with long contexts beside two prefill chunks, as a mixed scheduler step
    builds them.
    """
    gen = torch.Generator().manual_seed(5)
    dec_kv = torch.randint(100, 4000, (30,), generator=gen).tolist()
    q_lens, kv_lens = [1] * 30 + [256, 180], dec_kv + [256, 1200]
    batch = paged_batch(q_lens, kv_lens, 32, 8, 128, 64, dtype, torch.device("cuda"), seed=3)
    _check(batch, max_q_len=256)


@pytest.mark.parametrize("hint", [True, False])
def test_prefill_skips_the_first_sequences(hint, device, paged_batch):
    """``seq_offset=k`` computes sequences k and up and leaves the rows of the first k untouched
    (in a mixed batch they belong to the decode kernel)."""
    q_lens, kv_lens = [1, 1, 1, 12, 30], [50, 9, 33, 40, 30]
    batch = paged_batch(q_lens, kv_lens, 4, 2, 16, 16, torch.float32, device, seed=5)
    sentinel = torch.full_like(batch["q"], 7.0)
    out = prefill_attention(**batch, max_q_len=30 if hint else None, out=sentinel.clone(),
                            seq_offset=3)
    ref = reference.paged_attention(**batch)
    assert torch.equal(out[:3], sentinel[:3])
    torch.testing.assert_close(out[3:], ref[3:], **TOL[torch.float32])
