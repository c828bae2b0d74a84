"""paged_attention_triton (the registered op): dispatch between the decode and prefill kernels,
launches free of host syncs when the hints are given (CUDA-graph capture), and the package-level op
on CUDA tensors.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from vlmdeploy.kernels import reference  # noqa: E402
from vlmdeploy.kernels.triton_ops import paged_attention_triton  # noqa: E402

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=5e-3, rtol=5e-3)}


def leading_ones(q_lens: list[int]) -> int:
    n = 0
    while n < len(q_lens) and q_lens[n] == 1:
        n += 1
    return n


@pytest.mark.parametrize("q_lens,kv_lens", [([1, 1, 1], [5, 80, 33]),  # decode
                                            ([1, 12, 1], [40, 30, 7]),  # mixed
                                            ([1, 1, 1, 12, 5, 1], [90, 9, 47, 30, 7, 3]),
                                            ([0, 1, 9], [4, 33, 20])])  # a row with no token
@pytest.mark.parametrize("hints", [False, True])
def test_dispatch_interpreter(q_lens, kv_lens, hints, device, paged_batch):
    """With hints, the leading one-token rows of a mixed batch go to the decode kernel (split-K
    forced on by the interpreter's few multiprocessors) and the rest to the prefill kernel."""
    batch = paged_batch(q_lens, kv_lens, 4, 2, 16, 16, torch.float32, device, seed=len(q_lens))
    kw = dict(max_q_len=max(q_lens), max_kv_len=max(kv_lens),
              num_decode=leading_ones(q_lens)) if hints else {}
    out = paged_attention_triton(**batch, **kw)
    torch.testing.assert_close(out, reference.paged_attention(**batch), **TOL[torch.float32])


@pytest.mark.gpu
@pytest.mark.parametrize("n_decode", [1, 120])
def test_mixed_batch_split_gpu(n_decode, paged_batch):
    """A W2-like mixed step at the 8B attention shape: decode rows over long contexts first, then
    prefill chunks, one of them continuing a cached prefix."""
    gen = torch.Generator().manual_seed(n_decode)
    q_lens = [1] * n_decode + [1500, 700, 2]
    kv_lens = torch.randint(100, 3000, (n_decode,), generator=gen).tolist() + [1500, 2700, 40]
    batch = paged_batch(q_lens, kv_lens, 32, 8, 128, 64, torch.bfloat16, torch.device("cuda"))
    out = paged_attention_triton(**batch, max_q_len=1500, max_kv_len=max(kv_lens),
                                 num_decode=n_decode)
    torch.testing.assert_close(out, reference.paged_attention(**batch), **TOL[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.parametrize("max_q_len", [1, 64])
def test_graph_capture_gpu(max_q_len, paged_batch):
    """Captured once with hints, replayed after the lengths change in place: no host read, no stale
    split.
    """
    B, cap = 8, 4096
    q_lens = [1] * B if max_q_len == 1 else [max_q_len] * B
    batch = paged_batch(q_lens, [cap] * B, 32, 8, 128, 64, torch.bfloat16, torch.device("cuda"))
    run = lambda: paged_attention_triton(**batch, max_q_len=max_q_len, max_kv_len=cap)  # noqa: E731
    run()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    new_lens = torch.randint(max_q_len, cap + 1, (B,), generator=torch.Generator().manual_seed(1))
    batch["kv_lens"].copy_(new_lens.to(torch.int32))
    batch["q"].copy_(torch.randn_like(batch["q"]))
    graph.replay()
    torch.testing.assert_close(out, reference.paged_attention(**batch), **TOL[torch.bfloat16])


@pytest.mark.gpu
def test_package_op_uses_triton_on_cuda(paged_batch, monkeypatch):
    """vlmdeploy.kernels.paged_attention picks the registered kernel for CUDA tensors and agrees
    with the reference forced through VLMDEPLOY_KERNELS=reference.
    """
    from vlmdeploy import kernels

    batch = paged_batch([1, 7], [300, 7], 8, 2, 64, 16, torch.float16, torch.device("cuda"))
    args = list(batch.values())  # the package ops dispatch on their first positional argument
    out = kernels.paged_attention(*args, max_q_len=7, max_kv_len=300)
    assert kernels._TRITON.get("paged_attention") is paged_attention_triton
    monkeypatch.setenv("VLMDEPLOY_KERNELS", "reference")
    ref = kernels.paged_attention(*args, max_q_len=7, max_kv_len=300)
    torch.testing.assert_close(out, ref, **TOL[torch.float16])
