"""The Triton kernels over quantised KV caches (quant_policy 8, 4, 16) against the PyTorch
reference: the store (bit for bit: codes, scales and zero points), q/k norm + RoPE + store, paged
decode (split-K, fused norm-rope-store), prefill and mixed batches, GPT-OSS's sinks and window.
Caches keep NaN in every slot no sequence owns (in the scales, or fp8's values), so a stray read
shows in the output. Interpreter runs on CPU at small shapes; model sizes are marked ``gpu``.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tests.kernels.conftest import quantize_paged_batch  # noqa: E402
from vlmdeploy.kernels import reference  # noqa: E402
from vlmdeploy.kernels.decode_attention import decode_attention  # noqa: E402
from vlmdeploy.kernels.kv_quant import (  # noqa: E402
    KVQuant,
    cache_dtype,
    cache_width,
    dequantize_kv,
)
from vlmdeploy.kernels.prefill_attention import prefill_attention  # noqa: E402
from vlmdeploy.kernels.qk_norm_rope_kernel import qk_norm_rope_store_triton  # noqa: E402
from vlmdeploy.kernels.store_kv_kernel import store_kv_triton  # noqa: E402
from vlmdeploy.kernels.triton_ops import paged_attention_triton  # noqa: E402

POLICIES = [8, 4, 16]
# Attention over dequantised tiles: as over a plain cache of the activations' dtype. Triton's
# interpreter truncates fp32 -> bf16 where the GPU rounds, which costs up to one more bf16 step.
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=2e-2),
       torch.float16: dict(atol=5e-3, rtol=5e-3)}


def empty_caches(blocks: int, page: int, n_kv: int, D: int, policy: int, dtype: torch.dtype,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, KVQuant]:
    """k and v caches of ``policy`` holding random codes, their scales and zeros NaN."""
    gen = torch.Generator().manual_seed(policy)
    shape = (2, blocks, page, n_kv, cache_width(policy, D))
    codes = torch.randint(0, 255, shape, dtype=torch.uint8, generator=gen)
    codes = codes.view(cache_dtype(policy, dtype)).to(device)
    if policy == 16:
        return codes[0], codes[1], KVQuant(policy)
    sz = torch.full((2, blocks, page, n_kv, 2), float("nan"), dtype=dtype, device=device)
    return codes[0], codes[1], KVQuant(policy, sz[0], sz[1])


def dequantized(k_cache: torch.Tensor, v_cache: torch.Tensor, quant: KVQuant
                ) -> tuple[torch.Tensor, torch.Tensor]:
    return (dequantize_kv(k_cache, quant.k_scales_zeros, quant.policy, torch.float32),
            dequantize_kv(v_cache, quant.v_scales_zeros, quant.policy, torch.float32))


def assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal bit for bit (NaN where NaN): codes through their bytes, pairs as values."""
    if a.is_floating_point() and a.element_size() > 1:
        torch.testing.assert_close(a, b, atol=0, rtol=0, equal_nan=True)
    else:
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


# ---- store -----------------------------------------------------------------------------------
def _check_store(T: int, n_kv: int, D: int, page: int, policy: int, dtype: torch.dtype,
                 device: torch.device, seed: int) -> None:
    """Strided k/v (slices of a fused projection) into shuffled slots, a quarter of them -1:
    codes and pairs equal the reference's bit for bit, untouched slots keep their contents."""
    gen = torch.Generator().manual_seed(seed)
    blocks = -(-T // page) + 2
    kv = (torch.randn(T, 3 * n_kv * D, generator=gen) * 3).to(dtype).to(device)
    k = kv[:, n_kv * D:2 * n_kv * D].view(T, n_kv, D)
    v = kv[:, 2 * n_kv * D:].view(T, n_kv, D) + 2.0  # off-centre rows
    slots = torch.randperm(blocks * page, generator=gen)[:T]
    slots[torch.rand(T, generator=gen) < 0.25] = -1
    slots = slots.to(device)
    ours, ref = (empty_caches(blocks, page, n_kv, D, policy, dtype, device) for _ in range(2))
    store_kv_triton(k, v, ours[0], ours[1], slots, ours[2])
    reference.store_kv(k, v, ref[0], ref[1], slots, ref[2])
    for a, b in zip(ours[:2], ref[:2]):
        assert_same_bits(a, b)
    if policy != 16:
        assert_same_bits(ours[2].k_scales_zeros, ref[2].k_scales_zeros)
        assert_same_bits(ours[2].v_scales_zeros, ref[2].v_scales_zeros)
        written = int((~ours[2].v_scales_zeros.isnan()).all(-1).sum())
        assert written == n_kv * int((slots >= 0).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("T,n_kv,D,page", [(9, 2, 16, 16), (20, 3, 32, 8)])
def test_store_interpreter(T, n_kv, D, page, policy, dtype, device):
    _check_store(T, n_kv, D, page, policy, dtype, device, seed=T + policy)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("T,n_kv,D,page", [(1, 8, 128, 64), (2676, 8, 128, 64), (300, 4, 64, 16)])
def test_store_gpu(T, n_kv, D, page, policy, dtype):
    _check_store(T, n_kv, D, page, policy, dtype, torch.device("cuda"), seed=T)


# ---- q/k norm + RoPE + store -------------------------------------------------------------------
def _check_norm_rope_store(T: int, n_q: int, n_kv: int, D: int, page: int, policy: int,
                           dtype: torch.dtype, device: torch.device, seed: int) -> None:
    """The rotated k (which the kernel may round a step apart from the reference, see
    test_qk_norm_rope) and v quantised into the cache: dequantised, within one quantisation step
    and the rotation's tolerance of the reference's; v's codes bit for bit."""
    gen = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(T, (n_q + 2 * n_kv) * D, generator=gen) * 2).to(dtype).to(device)
    q = qkv[:, :n_q * D].view(T, n_q, D)
    k = qkv[:, n_q * D:(n_q + n_kv) * D].view(T, n_kv, D)
    v = qkv[:, (n_q + n_kv) * D:].view(T, n_kv, D)
    qw = (1 + 0.3 * torch.randn(D, generator=gen)).to(dtype).to(device)
    kw = (1 + 0.3 * torch.randn(D, generator=gen)).to(dtype).to(device)
    cos, sin = reference.rope_cos_sin(torch.randint(0, 40_000, (T,), generator=gen).to(device), D,
                                      1e6, dtype)
    blocks = T // page + 3
    slots = torch.randperm(blocks * page, generator=gen)[:T]
    slots[T // 2] = -1
    slots = slots.to(device)
    ours, ref = (empty_caches(blocks, page, n_kv, D, policy, dtype, device) for _ in range(2))
    args = (q, k, v, qw, kw, cos, sin, 1e-6)
    q_out = qk_norm_rope_store_triton(*args, ours[0], ours[1], slots, ours[2])
    q_ref = reference.qk_norm_rope_store(*args, ref[0], ref[1], slots, ref[2])
    torch.testing.assert_close(q_out, q_ref, equal_nan=True, atol=0.13, rtol=0.04)
    assert_same_bits(ours[1], ref[1])
    k_ours, _ = dequantized(*ours)
    k_ref, _ = dequantized(*ref)
    if policy == 16:  # one fp8 step: 2^-3 relative
        tol = dict(atol=0.13, rtol=0.13)
    else:
        scale = ref[2].k_scales_zeros[..., :1].float()
        tol = dict(atol=(scale.nan_to_num(0).max() + 0.13).item(), rtol=0.04)
    torch.testing.assert_close(k_ours, k_ref, equal_nan=True, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("policy", POLICIES)
def test_norm_rope_store_interpreter(policy, dtype, device):
    _check_norm_rope_store(9, 6, 2, 32, 4, policy, dtype, device, seed=policy)


@pytest.mark.gpu
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("T", [1, 2676])
def test_norm_rope_store_gpu(T, policy):
    _check_norm_rope_store(T, 32, 8, 128, 64, policy, torch.bfloat16, torch.device("cuda"),
                           seed=T)


# ---- attention -------------------------------------------------------------------------------
def _check_attention(out: torch.Tensor, batch: dict) -> None:
    ref = reference.paged_attention(**batch)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, **TOL[ref.dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_interpreter(num_splits, policy, dtype, device, paged_batch):
    batch = paged_batch([1] * 5, [1, 37, 100, 16, 64], 6, 2, 16, 16, dtype, device, seed=policy)
    batch = quantize_paged_batch(batch, policy)
    _check_attention(decode_attention(**batch, num_splits=num_splits), batch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("policy", POLICIES)
def test_prefill_interpreter(policy, dtype, device, paged_batch):
    """A decode row, a whole prompt, a chunk after a cached prefix, a short chunk, an idle one."""
    batch = paged_batch([1, 17, 40, 5, 0], [60, 17, 63, 55, 9], 6, 2, 16, 16, dtype, device,
                        seed=policy)
    batch = quantize_paged_batch(batch, policy)
    _check_attention(prefill_attention(**batch, max_q_len=40), batch)


@pytest.mark.parametrize("policy", POLICIES)
def test_mixed_batch_with_sinks_and_window_interpreter(policy, device, paged_batch):
    """The registered op on a mixed batch (decode rows to the decode kernel, chunks to prefill),
    plain and with GPT-OSS's sinks and sliding window."""
    batch = paged_batch([1, 1, 12, 3], [70, 9, 40, 33], 4, 2, 16, 16, torch.float32, device,
                        seed=4)
    batch = quantize_paged_batch(batch, policy)
    hints = dict(max_q_len=12, max_kv_len=70, num_decode=2)
    _check_attention(paged_attention_triton(**batch, **hints), batch)
    sinks = torch.randn(4, generator=torch.Generator().manual_seed(0)).to(device)
    gpt_oss = {**batch, "sinks": sinks, "window": 7}
    _check_attention(paged_attention_triton(**gpt_oss, **hints), gpt_oss)


def _check_decode_norm_rope(batch: dict, num_splits: int | None, fuse: bool | None) -> None:
    """Raw q/k/v of one token per sequence through the decode launch that normalises, rotates,
    quantises and stores them (or, unfused, the separate store first) against the reference's
    store-then-attend. The new token attends with its dequantised k and v, as a later read of
    the cache would give; the caches agree within one quantisation step (the rotation may round
    apart) and v's codes bit for bit."""
    q0, quant = batch["q"], batch["kv_quant"]
    T, n_q, D = q0.shape
    n_kv, page = batch["k_cache"].shape[2], batch["k_cache"].shape[1]
    dev, dtype = q0.device, q0.dtype
    gen = torch.Generator().manual_seed(T * 7 + n_q)
    qkv = (torch.randn(T, (n_q + 2 * n_kv) * D, generator=gen) * 2).to(dtype).to(dev)
    q = qkv[:, :n_q * D].view(T, n_q, D)
    k = qkv[:, n_q * D:(n_q + n_kv) * D].view(T, n_kv, D)
    v = qkv[:, (n_q + n_kv) * D:].view(T, n_kv, D)
    qw = (1 + 0.3 * torch.randn(D, generator=gen)).to(dtype).to(dev)
    kw = (1 + 0.3 * torch.randn(D, generator=gen)).to(dtype).to(dev)
    last = batch["kv_lens"].cpu().long() - 1
    slots = (batch["block_tables"].cpu()[torch.arange(T), last // page].long() * page
             + last % page).to(dev)
    cos, sin = reference.rope_cos_sin(last.to(dev), D, 1e6, dtype)
    clone = lambda t: None if t is None else t.clone()  # noqa: E731
    mine = KVQuant(quant.policy, clone(quant.k_scales_zeros), clone(quant.v_scales_zeros))
    caches = (batch["k_cache"].clone(), batch["v_cache"].clone(), mine)
    args = (q, k, v, qw, kw, cos, sin, 1e-6)
    layout = (batch["cu_seqlens_q"], batch["kv_lens"], batch["block_tables"], batch["scale"])
    out = decode_attention(q, caches[0], caches[1], *layout, num_splits=num_splits,
                           norm_rope=(*args[1:], slots), fuse=fuse, kv_quant=mine)
    ref = reference.paged_attention_norm_rope(*args, batch["k_cache"], batch["v_cache"], slots,
                                              *layout, kv_quant=quant)
    rope_tol = dict(atol=1.25e-1, rtol=3.2e-2) if dtype == torch.bfloat16 else TOL[dtype]
    torch.testing.assert_close(out, ref, **rope_tol)
    assert_same_bits(caches[1], batch["v_cache"])
    k_ours, _ = dequantized(*caches)
    k_ref, _ = dequantized(batch["k_cache"], batch["v_cache"], quant)
    step = 0.13 if quant.policy == 16 else quant.k_scales_zeros[..., 0].float().nan_to_num(0).max()
    torch.testing.assert_close(k_ours, k_ref, equal_nan=True, atol=float(step) + 0.13, rtol=0.04)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("num_splits,fuse", [(1, True), (3, True), (None, False)])
def test_decode_norm_rope_interpreter(num_splits, fuse, policy, dtype, device, paged_batch):
    batch = paged_batch([1] * 4, [1, 37, 100, 16], 4, 2, 16, 16, dtype, device, seed=policy)
    _check_decode_norm_rope(quantize_paged_batch(batch, policy), num_splits, fuse)


# ---- model sizes on the GPU ------------------------------------------------------------------
GPU_DECODE = [  # (batch, n_q, n_kv, head_dim, page, longest context)
    (1, 32, 8, 128, 64, 4096),
    (64, 32, 4, 128, 32, 2000),
    (5, 64, 8, 64, 64, 5000),
]


def _random_decode(B, n_q, n_kv, D, page, max_len, policy, paged_batch) -> dict:
    gen = torch.Generator().manual_seed(B)
    kv_lens = torch.randint(1, max_len + 1, (B,), generator=gen).tolist()
    kv_lens[0] = max_len
    batch = paged_batch([1] * B, kv_lens, n_q, n_kv, D, page, torch.bfloat16,
                        torch.device("cuda"), seed=B)
    return quantize_paged_batch(batch, policy)


@pytest.mark.gpu
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("B,n_q,n_kv,D,page,max_len", GPU_DECODE)
def test_decode_gpu(B, n_q, n_kv, D, page, max_len, policy, paged_batch):
    batch = _random_decode(B, n_q, n_kv, D, page, max_len, policy, paged_batch)
    _check_attention(decode_attention(**batch, max_kv_len=max_len), batch)
    _check_attention(decode_attention(**batch, num_splits=64), batch)
    _check_decode_norm_rope(batch, None, True)
    _check_decode_norm_rope(batch, None, None)


@pytest.mark.gpu
@pytest.mark.parametrize("policy", POLICIES)
def test_prefill_and_mixed_gpu(policy, paged_batch):
    """30 decode rows with long contexts beside two prefill chunks, and the 8B's 2,676-token
    prompt; GPT-OSS's sinks and window over the mixed batch."""
    gen = torch.Generator().manual_seed(5)
    q_lens = [1] * 30 + [256, 180]
    kv_lens = torch.randint(100, 4000, (30,), generator=gen).tolist() + [256, 1200]
    cuda = torch.device("cuda")
    batch = quantize_paged_batch(paged_batch(q_lens, kv_lens, 32, 8, 128, 64, torch.bfloat16,
                                             cuda, seed=3), policy)
    hints = dict(max_q_len=256, max_kv_len=max(kv_lens), num_decode=30)
    _check_attention(paged_attention_triton(**batch, **hints), batch)
    gpt_oss = {**batch, "sinks": torch.randn(32, device=cuda), "window": 128}
    _check_attention(paged_attention_triton(**gpt_oss, **hints), gpt_oss)
    prompt = quantize_paged_batch(paged_batch([2676], [2676], 32, 8, 128, 64, torch.bfloat16,
                                              cuda), policy)
    _check_attention(prefill_attention(**prompt, max_q_len=2676), prompt)
