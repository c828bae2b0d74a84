"""Kernel tests: each Triton launcher against its PyTorch reference.

Without CUDA the launchers run in Triton's interpreter on CPU tensors (small shapes only); tests
marked ``gpu`` run the compiled kernels at model sizes on the GPU machine (``pytest -m gpu``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import pytest
import torch

if not torch.cuda.is_available():
    # must be set before the kernel modules are imported: @triton.jit reads it at decoration time
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    return DEVICE


def make_paged_batch(q_lens: Sequence[int], kv_lens: Sequence[int], n_q: int, n_kv: int,
                     head_dim: int, page: int, dtype: torch.dtype, device: torch.device,
                     seed: int = 0) -> dict:
    """A packed batch over a shuffled paged cache whose unused slots hold NaN.

    Any read past a sequence's context (a stale slot, a padding -1 block entry) turns the output
    into NaN, so the comparison with the reference also checks the kernels' masking.
    """
    gen = torch.Generator().manual_seed(seed)
    n_blocks = [-(-kv // page) for kv in kv_lens]
    total = sum(n_blocks) + 3  # a few blocks no sequence owns
    order = torch.randperm(total, generator=gen)
    tables = torch.full((len(kv_lens), max(n_blocks, default=0) + 1), -1, dtype=torch.int32)
    k_cache = torch.full((total, page, n_kv, head_dim), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    used = 0
    for b, (kv, nb) in enumerate(zip(kv_lens, n_blocks, strict=True)):
        ids = order[used:used + nb]
        used += nb
        tables[b, :nb] = ids.to(torch.int32)
        pos = torch.arange(kv)
        slots = ids[pos // page] * page + pos % page  # (kv,) flat cache slots of the context
        for cache in (k_cache, v_cache):
            values = torch.randn(kv, n_kv, head_dim, generator=gen).to(dtype)
            cache.view(-1, n_kv, head_dim)[slots] = values
    cu = torch.tensor([0, *torch.tensor(list(q_lens)).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu[-1]), n_q, head_dim, generator=gen).to(dtype)
    return dict(q=q.to(device), k_cache=k_cache.to(device), v_cache=v_cache.to(device),
                cu_seqlens_q=cu.to(device), kv_lens=torch.tensor(list(kv_lens), dtype=torch.int32,
                                                                 device=device),
                block_tables=tables.to(device), scale=head_dim ** -0.5)


def quantize_paged_batch(batch: dict, policy: int, meta: torch.dtype | None = None) -> dict:
    """``make_paged_batch``'s batch with its caches quantised. Unused slots hold NaN: their scales
    (int4/int8) or values (fp8) stay NaN, so a stray read still shows in the output."""
    from vlmdeploy.kernels.kv_quant import KVQuant, quantize_kv

    meta = meta or batch["q"].dtype
    k, k_sz = quantize_kv(batch["k_cache"], policy, meta)
    v, v_sz = quantize_kv(batch["v_cache"], policy, meta)
    return {**batch, "k_cache": k, "v_cache": v, "kv_quant": KVQuant(policy, k_sz, v_sz)}


@pytest.fixture
def paged_batch() -> Callable[..., dict]:
    return make_paged_batch
