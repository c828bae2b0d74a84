"""The quantised KV cache formats (quant_policy 8, 4, 16) in the PyTorch reference, pinned against
float math: each head's round trip within the bound its scale and zero point promise, LMDeploy's
int4 packing, fp8's saturating cast, the reference store's layout, and attention over a quantised
cache against attention over the float cache it was made from.
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels.conftest import quantize_paged_batch
from vlmdeploy.kernels import reference
from vlmdeploy.kernels.kv_quant import (
    FP8_MAX,
    STEP_FLOOR,
    KVQuant,
    bytes_per_head,
    cache_dtype,
    cache_width,
    dequantize_kv,
    quantize_kv,
)

QMAX = {8: 255, 4: 15}
META = [torch.float32, torch.bfloat16, torch.float16]


def awkward_rows(seed: int, D: int = 32) -> torch.Tensor:
    """64 heads of every magnitude from 1e-3 to 1e2, and the hard cases: far from zero with a
    small range, nearly constant, constant, all zero, a single spike."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, D, generator=gen) * torch.logspace(-3, 2, 64)[:, None]
    x[1] = 100.0 + torch.rand(D, generator=gen)
    x[2] = 3.0 + 1e-4 * torch.randn(D, generator=gen)
    x[3] = -2.5
    x[4] = 0.0
    x[5] = 0.0
    x[5, 7] = 7.0
    return x


@pytest.mark.parametrize("meta", META)
@pytest.mark.parametrize("policy", [8, 4])
def test_integer_round_trip_is_within_half_a_step(policy, meta):
    """Every element comes back within half a step of the stored scale, or, where the stored zero
    point is off the exact one by more than half a code (rows far from zero, in bf16), within
    that offset times the scale; and the step is the smallest the format allows."""
    x = awkward_rows(policy).to(meta)
    codes, sz = quantize_kv(x, policy, meta)
    assert codes.dtype == torch.uint8 and codes.shape == (64, cache_width(policy, 32))
    assert sz.dtype == meta and sz.shape == (64, 2)
    back = dequantize_kv(codes, sz, policy, torch.float32)
    xf = x.float().double()
    scale, zero = sz.double().unbind(-1)
    lo, hi = xf.amin(-1), xf.amax(-1)
    amax = torch.maximum(lo.abs(), hi.abs())
    exact_zero = torch.where(scale > 0, -lo / scale.clamp_min(1e-300), 0.0)
    zero_err = (zero - exact_zero).abs()
    bound = scale * (torch.clamp(zero_err, min=0.5) + 1e-3) + 1e-6 * amax  # fp32 arithmetic
    err = (back.double() - xf).abs().amax(-1)
    assert (err <= bound).all(), (err - bound).max()
    info = torch.finfo(meta)
    least = torch.maximum((hi - lo) / QMAX[policy], amax * STEP_FLOOR)
    assert (scale <= least * (1 + 2 * info.eps) + info.smallest_normal * info.eps).all()
    assert (zero.abs() <= 4096 * (1 + info.eps)).all()  # never overflows fp16
    assert err[4] == 0 and err[5] <= 7 / QMAX[policy]  # all zero: exact; a spike: one step
    # where the storage dtype holds the zero point to half a code: the plain half-step bound
    near = zero.abs() < {torch.float32: 2**24, torch.float16: 2048, torch.bfloat16: 256}[meta]
    assert near.sum() >= 58
    assert (err[near] <= scale[near] * 0.501 + 1e-6 * amax[near]).all()


def test_int4_packs_two_codes_a_byte_as_lmdeploy_does():
    """Byte j holds element j in its low nibble and element j + D/2 in its high one."""
    x = torch.cat([torch.arange(16.0), torch.arange(15.0, -1.0, -1.0)])[None]  # codes = values
    codes, sz = quantize_kv(x, 4, torch.float32)
    j = torch.arange(16, dtype=torch.uint8)
    assert torch.equal(codes[0], j | ((15 - j) << 4))
    assert sz[0, 1] == 0 and sz[0, 0] == pytest.approx(1.0, rel=1e-6)
    torch.testing.assert_close(dequantize_kv(codes, sz, 4, torch.float32), x, atol=0, rtol=1e-6)


def test_fp8_is_a_saturating_cast_with_scale_one():
    """LMDeploy's fp8 policy: per-tensor scale 1.0, so values saturate at ±448 and keep e4m3's
    3-bit mantissa (relative error at most 2^-4; 2^-10 absolute among the subnormals)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 64, generator=gen) * torch.logspace(-4, 3, 16)[:, None]
    codes, sz = quantize_kv(x, 16, torch.bfloat16)
    assert sz is None and codes.dtype == torch.float8_e4m3fn
    back = dequantize_kv(codes, None, 16, torch.float32)
    inside = x.abs() <= FP8_MAX
    err = (back - x).abs()
    assert (err[inside] <= torch.clamp(x[inside].abs() * 2**-4, min=2**-10)).all()
    assert torch.equal(back[~inside], x[~inside].sign() * FP8_MAX)
    assert torch.equal(codes, x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn))


@pytest.mark.parametrize("policy", [8, 4, 16])
def test_reference_store_writes_codes_and_pairs_to_their_slots(policy):
    gen = torch.Generator().manual_seed(policy)
    T, n_kv, D, page, blocks = 7, 2, 16, 4, 5
    k, v = torch.randn(T, n_kv, D, generator=gen), torch.randn(T, n_kv, D, generator=gen)
    slots = torch.tensor([3, 17, -1, 0, 9, 10, 19])
    width, dtype = cache_width(policy, D), cache_dtype(policy, torch.float32)
    k_cache = torch.zeros(blocks, page, n_kv, width, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    sz = torch.full((2, blocks, page, n_kv, 2), -1.0) if policy != 16 else None
    quant = KVQuant(policy, *((sz[0], sz[1]) if sz is not None else ()))
    reference.store_kv(k, v, k_cache, v_cache, slots, quant)
    for cache, x, i in ((k_cache, k, 0), (v_cache, v, 1)):
        flat = cache.view(-1, n_kv, width)
        codes, pair = quantize_kv(x, policy, torch.float32)
        kept = slots >= 0
        assert torch.equal(flat[slots[kept]].view(torch.uint8), codes[kept].view(torch.uint8))
        untouched = torch.ones(blocks * page, dtype=torch.bool)
        untouched[slots[kept]] = False
        assert (flat[untouched].view(torch.uint8) == 0).all()
        if sz is not None:
            assert torch.equal(sz[i].view(-1, n_kv, 2)[slots[kept]], pair[kept])
            assert (sz[i].view(-1, n_kv, 2)[untouched] == -1).all()


def round_trip_error(batch: dict, quantized: dict) -> float:
    """The largest |dequantised - original| over the used slots of both caches."""
    policy, worst = quantized["kv_quant"].policy, 0.0
    for name, sz in (("k_cache", quantized["kv_quant"].k_scales_zeros),
                     ("v_cache", quantized["kv_quant"].v_scales_zeros)):
        back = dequantize_kv(quantized[name], sz, policy, torch.float32)
        worst = max(worst, (back - batch[name].float()).nan_to_num(0.0).abs().max().item())
    return worst


@pytest.mark.parametrize("meta", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("policy", [8, 4, 16])
def test_attention_over_a_quantised_cache_stays_near_the_float_cache(policy, meta, paged_batch):
    """The output is a softmax-weighted mean of dequantised values whose weights the keys' errors
    barely move: it stays within three times the cache's largest round-trip error of attention
    over the float cache (measured: at most 2.4x over these shapes and seeds), and that error is
    about half a step (int8 ~0.02, int4 ~0.3 on unit-normal heads; fp8 2^-4 relative)."""
    cpu = torch.device("cpu")
    for seed, D in ((0, 32), (1, 64)):
        batch = paged_batch([1, 9, 1, 30], [40, 9, 3, 45], 6, 2, D, 8, torch.float32, cpu, seed)
        quantized = quantize_paged_batch(batch, policy, meta)
        out = reference.paged_attention(**quantized)
        err = (out - reference.paged_attention(**batch)).abs().max().item()
        cache_err = round_trip_error(batch, quantized)
        assert 0 < err <= 3 * cache_err
        assert cache_err <= {8: 0.05, 4: 0.6, 16: 0.25}[policy]
        window = reference.paged_attention(**quantized, window=16, sinks=torch.zeros(6))
        plain = reference.paged_attention(**batch, window=16, sinks=torch.zeros(6))
        assert (window - plain).abs().max().item() <= 3 * cache_err  # GPT-OSS's path as well


def test_cache_bytes_per_head_follow_the_policy():
    """What one token's k (or v) of one head costs: codes plus a (scale, zero) pair."""
    D, bf16 = 128, torch.bfloat16
    assert bytes_per_head(0, D, bf16) == 256
    assert bytes_per_head(8, D, bf16) == 128 + 4
    assert bytes_per_head(4, D, bf16) == 64 + 4
    assert bytes_per_head(16, D, bf16) == 128
    assert bytes_per_head(8, D, torch.float32) == 128 + 8
