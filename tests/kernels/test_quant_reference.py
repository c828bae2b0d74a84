"""The quantised-weight references against float math: blocked FP8 quantisation within e4m3's
rounding bound, the FP8 GEMM equal to a float GEMM of the dequantised operands and near the
full-precision one, AutoAWQ's packing order on a word written out by hand, and the W4A16 GEMM
equal to a float GEMM of the weight rebuilt element by element."""

from __future__ import annotations

import pytest
import torch

from vlmdeploy.kernels import quant_reference as ref
from vlmdeploy.quant.awq import pack_int4, quantize_rtn


def blocky(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Random values whose magnitude changes by orders from block to block (so a shared scale
    would be wrong), with one all-zero 128 × 128 block."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen)
    mag = 10.0 ** torch.randint(-4, 3, (-(-rows // 128), -(-cols // 128)), generator=gen)
    x = x * mag.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
    x[:128, :128] = 0
    return x


@pytest.mark.parametrize("shape", [(256, 384), (200, 300), (128, 128), (5, 1000)])
def test_fp8_blocks_round_within_e4m3s_bound(shape):
    x = blocky(*shape)
    q, s = ref.fp8_quantize_blocks(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = x[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            amax = blk.abs().max()
            assert s[i, j] == (amax / 448 if amax > 0 else 1.0)  # the largest maps to ±448
            qb = q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].float()
            assert qb.abs().max() == (448.0 if amax > 0 else 0.0)
    back = ref.fp8_dequantize_blocks(q, s)
    scale = s.repeat_interleave(128, 0)[: shape[0]].repeat_interleave(128, 1)[:, : shape[1]]
    # e4m3: 3 mantissa bits, so half a step is 2^-4 of a normal value; below 2^-6 (subnormal)
    # the step is 2^-9, half of it 2^-10, in units of the block's scale
    bound = torch.maximum(x.abs() * 2.0**-4, scale * 2.0**-10)
    assert ((back - x).abs() <= bound * (1 + 1e-6)).all()
    assert back[:128, :128].eq(0).all()


def test_fp8_activations_take_one_scale_per_token_and_group():
    x = torch.randn(3, 300, generator=torch.Generator().manual_seed(1))
    x[1] *= 1000  # rows are independent
    x[2, 200] = 50.0  # and so are groups
    q, s = ref.fp8_quantize_act(x)
    assert s.shape == (3, 3)
    for m in range(3):
        for g in range(3):
            assert s[m, g] == x[m, g * 128:(g + 1) * 128].abs().max() / 448


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_is_a_float_gemm_of_the_dequantised_operands(dtype):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(7, 300, generator=gen).to(dtype)
    w = torch.randn(200, 300, generator=gen) * 0.05
    bias = torch.randn(200, generator=gen)
    q, s = ref.fp8_quantize_blocks(w)
    y = ref.fp8_linear(x, q, s, bias=bias)
    assert y.shape == (7, 200) and y.dtype == dtype
    # the operands rebuilt element by element, then a float64 GEMM
    wq = torch.empty(200, 300, dtype=torch.float64)
    for n in range(200):
        for kb in range(3):
            cols = slice(kb * 128, (kb + 1) * 128)
            wq[n, cols] = q[n, cols].double() * s[n // 128, kb].double()
    xq, xs = ref.fp8_quantize_act(x)
    xd = xq.double() * xs.double().repeat_interleave(128, 1)[:, :300]
    expected = (xd @ wq.T + bias.double()).to(dtype)
    torch.testing.assert_close(y, expected, **({"rtol": 1e-5, "atol": 1e-5} if dtype ==
                                               torch.float32 else {"rtol": 8e-3, "atol": 8e-3}))
    # and near the full-precision product: two e4m3 roundings, each within 2^-4 of a value
    exact = x.double() @ w.double().T + bias.double()
    assert ((y.double() - exact).norm() / exact.norm()) < 0.05


def test_awq_packing_order_on_a_word_written_by_hand():
    # AutoAWQ packs columns 0..7 of a word as nibbles in the order 0, 2, 4, 6, 1, 3, 5, 7: the
    # values 1..8 of columns 0..7 become nibbles (low first) 1, 3, 5, 7, 2, 4, 6, 8
    word = 0x86427531 - 2**32  # as int32
    columns = torch.arange(1, 9, dtype=torch.int32)[None, :]  # (1, 8)
    assert pack_int4(columns).tolist() == [[word]]
    assert ref.unpack_int4(torch.tensor([[word]], dtype=torch.int32)).tolist() == [
        list(range(1, 9))]
    # two words in a row: columns 8..15 belong to the second
    two = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 15, 0, 0, 0, 0, 0, 0, 9]], dtype=torch.int32)
    packed = pack_int4(two)
    assert packed.shape == (1, 2) and packed[0, 1].item() == (9 << 28 | 15) - 2**32
    assert torch.equal(ref.unpack_int4(packed), two)


def test_awq_unpack_inverts_pack_over_every_value():
    gen = torch.Generator().manual_seed(3)
    values = torch.randint(0, 16, (37, 64), generator=gen, dtype=torch.int32)
    assert torch.equal(ref.unpack_int4(pack_int4(values)), values)


@pytest.mark.parametrize("group", [64, 128])
def test_w4a16_linear_is_a_float_gemm_of_the_rebuilt_weight(group):
    gen = torch.Generator().manual_seed(4)
    k, n = 256, 48
    w = torch.randn(n, k, generator=gen) * 0.02
    qweight, qzeros, scales = quantize_rtn(w, group)
    assert qweight.shape == (k, n // 8) and qzeros.shape == (k // group, n // 8)
    assert scales.shape == (k // group, n) and scales.dtype == torch.float16
    q, z = ref.unpack_int4(qweight), ref.unpack_int4(qzeros)
    rebuilt = torch.empty(k, n, dtype=torch.float64)
    for kk in range(k):
        g = kk // group
        rebuilt[kk] = (q[kk] - z[g]).double() * scales[g].double()
    # round to nearest: every weight within half a step of its group's grid, but a group's
    # extremes, which the rounded zero point may push past 0..15 by half a step
    err = (rebuilt - w.double().T).abs()
    step = scales.double().repeat_interleave(group, 0)
    assert (err <= step * 1.001).all() and (err <= step * 0.501).double().mean() > 0.98
    x = torch.randn(5, k, generator=gen)
    torch.testing.assert_close(ref.w4a16_linear(x, qweight, qzeros, scales, group),
                               (x.double() @ rebuilt).float(), rtol=1e-5, atol=1e-5)
    assert torch.equal(ref.awq_dequantize(qweight, qzeros, scales, group), rebuilt.float())
