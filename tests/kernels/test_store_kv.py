"""store_kv_triton against reference.store_kv: shuffled slots, skipped (-1) slots, strided k/v,
every page size, a cache dtype other than the activations'.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from vlmdeploy.kernels import reference  # noqa: E402
from vlmdeploy.kernels.store_kv_kernel import store_kv_triton  # noqa: E402


def _check(T: int, n_kv: int, D: int, page: int, dtype: torch.dtype, cache_dtype: torch.dtype,
           slot_dtype: torch.dtype, device: torch.device, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    num_blocks = -(-T // page) + 2
    # k and v as slices of a fused projection: strided rows
    kv = torch.randn(T, 3 * n_kv * D, generator=gen).to(dtype).to(device)
    k = kv[:, n_kv * D:2 * n_kv * D].view(T, n_kv, D)
    v = kv[:, 2 * n_kv * D:].view(T, n_kv, D)
    slots = torch.randperm(num_blocks * page, generator=gen)[:T]
    slots[torch.rand(T, generator=gen) < 0.25] = -1  # padding / already-cached tokens
    slots = slots.to(slot_dtype).to(device)
    # random (not zero) caches: untouched slots must keep their values
    k_cache = torch.randn(num_blocks, page, n_kv, D, generator=gen).to(cache_dtype).to(device)
    v_cache = torch.randn(num_blocks, page, n_kv, D, generator=gen).to(cache_dtype).to(device)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv_triton(k, v, k_cache, v_cache, slots)
    reference.store_kv(k, v, k_ref, v_ref, slots)
    torch.testing.assert_close(k_cache, k_ref, atol=0, rtol=0)
    torch.testing.assert_close(v_cache, v_ref, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,n_kv,D,page", [(1, 2, 16, 16), (9, 2, 16, 16), (37, 1, 32, 32),
                                           (20, 3, 16, 64)])
def test_store_kv_interpreter(T, n_kv, D, page, dtype, device):
    _check(T, n_kv, D, page, dtype, dtype, torch.int64, device, seed=T + page)


def test_store_kv_int32_slots_and_cast(device):
    _check(13, 2, 16, 16, torch.float32, torch.float16, torch.int32, device, seed=7)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("page", [16, 32, 64])
@pytest.mark.parametrize("T,n_kv,D", [(1, 8, 128), (2676, 8, 128), (300, 4, 64)])
def test_store_kv_gpu(T, n_kv, D, page, dtype):
    _check(T, n_kv, D, page, dtype, dtype, torch.int32, torch.device("cuda"), seed=T)
