"""GPT-OSS's attention options — a learned sink logit per head and a sliding window — in the
reference (against a naive softmax over the concatenated logits, as GPT-OSS writes it) and in the
paged decode and prefill kernels (against the reference, in Triton's interpreter on CPU, at real
shapes on the GPU). Contexts run past the window so that every kernel skips or masks keys below it.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from vlmdeploy.kernels import reference  # noqa: E402
from vlmdeploy.kernels.decode_attention import decode_attention  # noqa: E402
from vlmdeploy.kernels.prefill_attention import prefill_attention  # noqa: E402
from vlmdeploy.kernels.triton_ops import paged_attention_triton  # noqa: E402

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
OPTIONS = [dict(sinks=True, window=None), dict(sinks=False, window=7),
           dict(sinks=True, window=20)]


def with_options(batch: dict, sinks: bool, window: int | None, seed: int = 0) -> dict:
    n_q = batch["q"].shape[1]
    gen = torch.Generator().manual_seed(seed)
    s = (torch.randn(n_q, generator=gen) * 2).to(batch["q"].device) if sinks else None
    return {**batch, "sinks": s, "window": window}


def naive(batch: dict) -> torch.Tensor:
    """Per sequence, in float64: the full context unpaged, the sink appended to the logits."""
    q, out = batch["q"].double(), torch.empty_like(batch["q"])
    cu, lens = batch["cu_seqlens_q"].tolist(), batch["kv_lens"].tolist()
    page = batch["k_cache"].shape[1]
    group = q.shape[1] // batch["k_cache"].shape[2]
    for b, kv_len in enumerate(lens):
        s, e = cu[b], cu[b + 1]
        pos = torch.arange(kv_len)
        slots = batch["block_tables"][b].long()[pos // page] * page + pos % page
        k = batch["k_cache"].flatten(0, 1)[slots].double().repeat_interleave(group, 1)
        v = batch["v_cache"].flatten(0, 1)[slots].double().repeat_interleave(group, 1)
        for i in range(e - s):
            p = kv_len - (e - s) + i
            lo = 0 if batch["window"] is None else max(0, p - batch["window"] + 1)
            logits = torch.einsum("hd,khd->hk", q[s + i], k[lo:p + 1]) * batch["scale"]
            if batch["sinks"] is not None:
                logits = torch.cat([logits, batch["sinks"].double()[:, None]], dim=1)
            probs = logits.softmax(-1)[:, : p + 1 - lo]
            out[s + i] = torch.einsum("hk,khd->hd", probs, v[lo:p + 1]).to(out.dtype)
    return out


@pytest.mark.parametrize("opts", OPTIONS)
def test_reference_matches_naive(opts, paged_batch):
    batch = with_options(paged_batch([1, 9, 1, 30], [40, 9, 3, 45], 6, 2, 16, 8, torch.float32,
                                     torch.device("cpu"), seed=3), **opts)
    torch.testing.assert_close(reference.paged_attention(**batch), naive(batch),
                               atol=1e-5, rtol=1e-5)


def test_reference_without_options_is_unchanged(paged_batch):
    batch = paged_batch([1, 9], [40, 9], 4, 2, 16, 8, torch.float32, torch.device("cpu"))
    plain = reference.paged_attention(**batch)
    assert torch.equal(reference.paged_attention(**batch, sinks=None, window=None), plain)
    # a window as long as every context masks nothing
    wide = reference.paged_attention(**batch, window=40)
    torch.testing.assert_close(wide, plain, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_kernel_interpreter(opts, num_splits, device, paged_batch):
    """Contexts shorter and longer than the window, three query heads per kv head; with splits
    the sink joins in the merge."""
    batch = with_options(paged_batch([1, 1, 1, 1], [5, 47, 21, 64], 6, 2, 16, 8, torch.float32,
                                     device, seed=1), **opts)
    out = decode_attention(**batch, num_splits=num_splits)
    torch.testing.assert_close(out, reference.paged_attention(**batch), **TOL[torch.float32])


@pytest.mark.parametrize("opts", OPTIONS)
def test_prefill_kernel_interpreter(opts, device, paged_batch):
    """Whole prompts and chunks that continue a cached prefix, longer than the window; tiles
    (BLOCK_M 32 rows = 16 queries x 2 heads) whose rows see disjoint windows."""
    batch = with_options(paged_batch([37, 5, 50], [37, 61, 90], 4, 2, 16, 16, torch.float32,
                                     device, seed=2), **opts)
    out = prefill_attention(**batch)
    torch.testing.assert_close(out, reference.paged_attention(**batch), **TOL[torch.float32])


@pytest.mark.parametrize("opts", OPTIONS)
def test_mixed_batch_interpreter(opts, device, paged_batch):
    """The registered op: decode rows to the decode kernel, the rest to prefill, options to both."""
    q_lens, kv_lens = [1, 1, 12, 3], [70, 9, 40, 33]
    batch = with_options(paged_batch(q_lens, kv_lens, 4, 2, 16, 16, torch.float32, device,
                                     seed=4), **opts)
    out = paged_attention_triton(**batch, max_q_len=12, max_kv_len=70, num_decode=2)
    torch.testing.assert_close(out, reference.paged_attention(**batch), **TOL[torch.float32])


@pytest.mark.gpu
@pytest.mark.parametrize("opts", [dict(sinks=True, window=None), dict(sinks=True, window=128)])
@pytest.mark.parametrize("q_lens,kv_lens", [([1] * 8, [5, 130, 4000, 127, 128, 129, 900, 64]),
                                            ([1, 1, 700, 300], [3000, 90, 700, 2000])])
def test_gpt_oss_shape_gpu(opts, q_lens, kv_lens, paged_batch):
    """GPT-OSS-20B's attention: 64 query heads, 8 kv heads, head_dim 64, window 128, bf16."""
    batch = with_options(paged_batch(q_lens, kv_lens, 64, 8, 64, 64, torch.bfloat16,
                                     torch.device("cuda")), **opts)
    nd = sum(1 for n in q_lens if n == 1) if max(q_lens) > 1 else 0
    out = paged_attention_triton(**batch, max_q_len=max(q_lens), max_kv_len=max(kv_lens),
                                 num_decode=nd)
    torch.testing.assert_close(out, reference.paged_attention(**batch), **TOL[torch.bfloat16])
