"""The fused MoE op: its reference against a naive loop over tokens and choices; the router's
Triton kernel against the reference router; the expert alignment's invariants (and its
one-program kernel against the sorting path); fused_moe_triton against the reference over odd
shapes and dtypes (Triton's interpreter on the CPU; model shapes on the GPU, marked ``gpu``).
Inactive experts hold NaN where it matters, so reading one would show.

Each comes twice: Qwen3-MoE's experts (SwiGLU, gate rows then up rows, no biases, softmax
router) and GPT-OSS's (biases, gate/up interleaved in ``x @ W`` weights, the clamped SwiGLU, the
router's softmax over its top-k logits), the compile-time switches of the same kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlmdeploy.kernels import reference
from vlmdeploy.kernels.reference import ClampedSwiGLU

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
       torch.float16: dict(atol=4e-3, rtol=4e-3)}


def naive_moe(x, w_gate_up, w_down, weights, ids):
    """One token and one choice at a time, in fp32."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    inter = w_gate_up.shape[1] // 2
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gate_up = w_gate_up[e].float() @ x[t].float()
            h = F.silu(gate_up[:inter]) * gate_up[inter:]
            out[t] += weights[t, j].float() * (w_down[e].float() @ h)
    return out


def make_case(t: int, e: int, k: int, hidden: int, inter: int, dtype: torch.dtype, seed: int = 0,
              idle_nan: bool = False, device: str = "cpu"):
    """Inputs of one MoE call; the router favours the first half of the experts, so some have no
    tokens (filled with NaN with ``idle_nan``)."""
    gen = torch.Generator(device).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device)

    x = randn(t, hidden).to(dtype)
    w1 = (randn(e, 2 * inter, hidden) * hidden**-0.5).to(dtype)
    w2 = (randn(e, hidden, inter) * inter**-0.5).to(dtype)
    logits = randn(t, e)
    logits[:, e // 2 :] -= 4.0 if t > 4 else 0.0
    weights, ids = reference.moe_route(logits, k, renormalize=True)
    if idle_nan:
        idle = torch.ones(e, dtype=torch.bool, device=device)
        idle[ids.flatten().long()] = False
        w1[idle], w2[idle] = float("nan"), float("nan")
    return x, w1, w2, weights, ids


@pytest.mark.parametrize("t,e,k,hidden,inter", [(1, 8, 2, 16, 12), (9, 6, 3, 20, 7),
                                                (40, 16, 4, 24, 10)])
def test_reference_equals_naive_loop(t, e, k, hidden, inter):
    x, w1, w2, weights, ids = make_case(t, e, k, hidden, inter, torch.float32, idle_nan=True)
    out = reference.fused_moe(x, w1, w2, weights, ids)
    torch.testing.assert_close(out, naive_moe(x, w1, w2, weights, ids), atol=1e-5, rtol=1e-5)


def test_route_softmax_topk_renormalised():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0], [3.0, 3.5, -2.0, 0.5]])
    w, ids = reference.moe_route(logits, 2, renormalize=False)
    probs = logits.softmax(-1)
    assert ids.dtype == torch.int32 and ids.tolist() == [[1, 2], [1, 0]]
    torch.testing.assert_close(w, probs.gather(1, ids.long()))
    w_norm, ids_norm = reference.moe_route(logits, 2, renormalize=True)
    assert torch.equal(ids_norm, ids)
    torch.testing.assert_close(w_norm, w / w.sum(-1, keepdim=True))
    torch.testing.assert_close(w_norm.sum(-1), torch.ones(2))


# ---- GPT-OSS's experts: the reference

GPT_OSS_ACT = ClampedSwiGLU(alpha=1.702, limit=7.0)


def naive_gpt_oss(x, gate_up, gate_up_bias, down, down_bias, weights, ids):
    """GPT-OSS's experts as transformers writes them, one token and one choice at a time, in
    fp32, on the checkpoint's tensors: ``gate_up`` (E, H, 2I) interleaved, ``down`` (E, I, H)."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    limit, alpha = GPT_OSS_ACT.limit, GPT_OSS_ACT.alpha
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = x[t].float() @ gate_up[e].float() + gate_up_bias[e].float()
            gate, up = h[0::2].clamp(max=limit), h[1::2].clamp(-limit, limit)
            y = ((up + 1) * gate * torch.sigmoid(alpha * gate)) @ down[e].float()
            out[t] += weights[t, j].float() * (y + down_bias[e].float())
    return out


def make_gpt_oss_case(t: int, e: int, k: int, hidden: int, inter: int, dtype: torch.dtype,
                      seed: int = 0, idle_nan: bool = False, device: str = "cpu"):
    """Inputs of one GPT-OSS MoE call in the checkpoint's layout: x, (gate_up (E, H, 2I),
    gate_up_bias, down (E, I, H), down_bias), weights, ids. Projections of std 4 cross the
    clamps at ±7; idle experts' weights and biases are NaN with ``idle_nan``."""
    gen = torch.Generator(device).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device)

    x = randn(t, hidden).to(dtype)
    experts = [(randn(e, hidden, 2 * inter) * 4 * hidden**-0.5).to(dtype),
               randn(e, 2 * inter).to(dtype),
               (randn(e, inter, hidden) * inter**-0.5).to(dtype),
               randn(e, hidden).to(dtype)]
    logits = randn(t, e) * 2
    logits[:, e // 2 :] -= 4.0 if t > 4 else 0.0  # some experts idle
    weights, ids = reference.moe_route(logits, k, False, topk_then_softmax=True)
    if idle_nan:
        idle = torch.ones(e, dtype=torch.bool, device=device)
        idle[ids.flatten().long()] = False
        for w in experts:
            w[idle] = float("nan")
    return x, experts, weights, ids


def gpt_oss_args(x, experts, weights, ids, down_bias: bool = True):
    """:func:`reference.fused_moe`'s arguments for GPT-OSS's experts, as the model passes them."""
    gate_up, gate_up_bias, down, down_bias_ = experts
    kwargs = dict(gate_up_bias=gate_up_bias, down_bias=down_bias_ if down_bias else None,
                  interleaved=True, activation=GPT_OSS_ACT)
    return (x, gate_up.transpose(1, 2), down.transpose(1, 2), weights, ids), kwargs


@pytest.mark.parametrize("t,e,k,hidden,inter", [(1, 8, 4, 16, 12), (9, 6, 3, 20, 7),
                                                (40, 16, 4, 24, 10)])
def test_gpt_oss_reference_equals_naive_loop(t, e, k, hidden, inter):
    x, experts, weights, ids = make_gpt_oss_case(t, e, k, hidden, inter, torch.float32,
                                                 idle_nan=True)
    args, kwargs = gpt_oss_args(x, experts, weights, ids)
    out = reference.fused_moe(*args, **kwargs)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, naive_gpt_oss(x, *experts, weights, ids), atol=1e-5,
                               rtol=1e-5)


def test_gpt_oss_case_reaches_the_clamps():
    x, (gate_up, *_), _, _ = make_gpt_oss_case(9, 6, 3, 20, 7, torch.float32)
    h = torch.einsum("th,ehn->etn", x, gate_up)
    assert (h[..., 0::2] > 7).any() and (h[..., 1::2].abs() > 7).any()


def test_gpt_oss_down_bias_is_linear_in_the_ranks():
    """Tensor parallel: two ranks' halves of the intermediate width (a contiguous run of gate/up
    pairs each), the down bias on rank 0 alone; their outputs sum to the whole (the all-reduce)."""
    x, experts, weights, ids = make_gpt_oss_case(7, 6, 3, 20, 8, torch.float32)
    args, kwargs = gpt_oss_args(x, experts, weights, ids)
    whole = reference.fused_moe(*args, **kwargs)
    gate_up, gate_up_bias, down, down_bias = experts
    parts = []
    for rank, (cols, rows) in enumerate([(slice(0, 8), slice(0, 4)), (slice(8, 16), slice(4, 8))]):
        shard = (gate_up[..., cols], gate_up_bias[:, cols], down[:, rows], down_bias)
        args, kwargs = gpt_oss_args(x, shard, weights, ids, down_bias=rank == 0)
        parts.append(reference.fused_moe(*args, **kwargs))
    torch.testing.assert_close(parts[0] + parts[1], whole, atol=1e-5, rtol=1e-5)


def test_route_topk_then_softmax():
    """GPT-OSS's router: the k largest logits, a softmax over those k alone, whatever their
    offset (all far below zero here)."""
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0], [3.0, 3.5, -2.0, 0.5]]) - 200.0
    w, ids = reference.moe_route(logits, 2, False, topk_then_softmax=True)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert ids.tolist() == [[1, 2], [1, 0]]
    torch.testing.assert_close(w, logits.gather(1, ids.long()).softmax(-1))


# ---- the Triton kernel (interpreter on the CPU)

triton = pytest.importorskip("triton")
from vlmdeploy.kernels.fused_moe_kernel import (  # noqa: E402
    SMALL_ALIGN_PAIRS,
    _moe_align_small,
    _moe_align_sorted,
    fused_moe_triton,
    moe_align,
)


def random_ids(t: int, k: int, e: int, seed: int = 1) -> torch.Tensor:
    """k experts per token, the first few favoured (some get many pairs; a token may repeat one)."""
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(e, generator=gen)[:k] for _ in range(t)]
    ids = (torch.stack(rows) if rows else torch.empty(0, k)).to(torch.int32)
    return torch.where(ids % 3 == 0, ids // 3, ids).to(torch.int32)


@pytest.mark.parametrize("t,k,e,block_m", [(1, 8, 128, 16), (3, 2, 5, 4), (50, 4, 16, 16),
                                           (0, 2, 4, 16), (40, 8, 128, 16), (200, 2, 8, 32)])
def test_align_groups_every_pair_once_by_expert(t, k, e, block_m):
    ids = random_ids(t, k, e)
    sorted_pairs, block_expert = moe_align(ids, e, block_m)
    n = t * k
    blocks = sorted_pairs.view(-1, block_m)
    assert blocks.shape[0] == block_expert.numel()
    real = sorted_pairs[sorted_pairs < n]
    assert sorted(real.tolist()) == list(range(n))  # each pair exactly once
    flat = ids.flatten()
    for b, expert in enumerate(block_expert.tolist()):
        pairs = blocks[b][blocks[b] < n]
        if expert == e:  # past the last run: empty
            assert pairs.numel() == 0
        else:
            assert pairs.numel() > 0 and (flat[pairs.long()] == expert).all()
            assert pairs.tolist() == sorted(pairs.tolist())  # token order within an expert
    # only experts with pairs get blocks: one token's step names exactly its k experts
    assert set(block_expert[block_expert < e].tolist()) == set(flat.tolist())


@pytest.mark.parametrize("t,k,e,block_m", [(1, 8, 128, 16), (3, 2, 5, 16), (16, 8, 128, 16),
                                           (32, 8, 128, 32), (57, 3, 7, 16)])
def test_one_program_align_equals_sorting(t, k, e, block_m):
    assert t * k <= SMALL_ALIGN_PAIRS
    ids = random_ids(t, k, e, seed=t)
    n = t * k
    blocks = triton.cdiv(n + min(n, e) * (block_m - 1), block_m)
    small = _moe_align_small(ids, e, block_m, blocks)
    ref = _moe_align_sorted(ids, e, block_m, blocks)
    assert torch.equal(small[0], ref[0]) and torch.equal(small[1], ref[1])


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("t,e,k,hidden,inter", [(1, 8, 2, 32, 48), (7, 5, 3, 40, 24),
                                                (33, 8, 2, 72, 40), (2, 4, 4, 16, 17)])
def test_triton_matches_reference(t, e, k, hidden, inter, dtype):
    x, w1, w2, weights, ids = make_case(t, e, k, hidden, inter, dtype, seed=t, idle_nan=True)
    out = fused_moe_triton(x, w1, w2, weights, ids)
    ref = reference.fused_moe(x, w1, w2, weights, ids)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all()  # the NaN weights of idle experts were never read
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol["atol"] * ref.abs().max(),
                               rtol=tol["rtol"])


@pytest.mark.parametrize("block_m", [16, 32])
def test_triton_block_sizes_and_strided_input(block_m):
    x, w1, w2, weights, ids = make_case(21, 6, 2, 48, 20, torch.float32, seed=5)
    wide = torch.cat([x, x], dim=1)[:, :48]  # rows with a stride of 96
    out = fused_moe_triton(wide, w1, w2, weights, ids, block_m=block_m)
    torch.testing.assert_close(out, reference.fused_moe(x, w1, w2, weights, ids),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("t,e,k", [(1, 128, 8), (5, 8, 2), (3, 7, 7), (4, 60, 5)])
def test_route_kernel_matches_reference(t, e, k, renormalize):
    from vlmdeploy.kernels.moe_route_kernel import moe_route_triton

    logits = torch.randn(t, e, generator=torch.Generator().manual_seed(e)) * 3
    for x in (logits, logits.to(torch.bfloat16)):
        w, ids = moe_route_triton(x, k, renormalize)
        w_ref, ids_ref = reference.moe_route(x, k, renormalize)
        assert ids.dtype == torch.int32 and w.dtype == torch.float32
        assert torch.equal(ids, ids_ref)
        torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=1e-5)


def test_triton_empty_batch():
    x, w1, w2, weights, ids = make_case(0, 4, 2, 16, 16, torch.float32)
    assert fused_moe_triton(x, w1, w2, weights, ids).shape == (0, 16)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("t,e,k,hidden,inter", [(1, 8, 4, 32, 24), (7, 5, 3, 40, 20),
                                                (33, 8, 4, 48, 36), (2, 4, 4, 16, 17)])
def test_gpt_oss_triton_matches_reference(t, e, k, hidden, inter, dtype):
    x, experts, weights, ids = make_gpt_oss_case(t, e, k, hidden, inter, dtype, seed=t,
                                                 idle_nan=True)
    args, kwargs = gpt_oss_args(x, experts, weights, ids)
    out = fused_moe_triton(*args, **kwargs)
    ref = reference.fused_moe(*args, **kwargs)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all()  # no weight or bias of an idle expert was read
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol["atol"] * ref.abs().max(),
                               rtol=tol["rtol"])


@pytest.mark.parametrize("bias,interleaved,clamped", [(True, False, False), (False, True, False),
                                                      (False, False, True), (True, True, True)])
def test_triton_switches_match_reference(bias, interleaved, clamped):
    """Each compile-time switch alone, and all together, on Qwen3-MoE's layout of weights."""
    x, w1, w2, weights, ids = make_case(9, 6, 2, 24, 13, torch.float32, seed=3)
    gen = torch.Generator().manual_seed(4)
    kwargs = dict(interleaved=interleaved, activation=GPT_OSS_ACT if clamped else None)
    if bias:
        kwargs.update(gate_up_bias=torch.randn(6, 26, generator=gen),
                      down_bias=torch.randn(6, 24, generator=gen))
    out = fused_moe_triton(x * 8, w1, w2, weights, ids, **kwargs)  # x 8: past the clamps
    torch.testing.assert_close(out, reference.fused_moe(x * 8, w1, w2, weights, ids, **kwargs),
                               atol=1e-5, rtol=1e-5)


def test_gpt_oss_triton_rank_without_down_bias():
    x, experts, weights, ids = make_gpt_oss_case(5, 6, 3, 24, 10, torch.float32, seed=2)
    args, kwargs = gpt_oss_args(x, experts, weights, ids, down_bias=False)
    torch.testing.assert_close(fused_moe_triton(*args, **kwargs),
                               reference.fused_moe(*args, **kwargs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("t,e,k", [(1, 32, 4), (5, 8, 2), (3, 7, 7), (4, 60, 5)])
def test_route_kernel_topk_then_softmax_matches_reference(t, e, k):
    from vlmdeploy.kernels.moe_route_kernel import moe_route_triton

    logits = torch.randn(t, e, generator=torch.Generator().manual_seed(e)) * 3
    # far below zero (the softmax must shift by the top logit), and in bf16 (near zero: far
    # from it, bf16 logits tie)
    for x in (logits - 50, logits.to(torch.bfloat16)):
        w, ids = moe_route_triton(x, k, False, topk_then_softmax=True)
        w_ref, ids_ref = reference.moe_route(x, k, False, topk_then_softmax=True)
        assert ids.dtype == torch.int32 and w.dtype == torch.float32
        assert torch.equal(ids, ids_ref)
        torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=1e-5)


# ---- model shapes on the GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 7, 256, 2048])
@pytest.mark.parametrize("hidden,inter", [(2048, 768), (4096, 1536), (2048, 384)])
def test_triton_matches_reference_gpu(tokens, hidden, inter, dtype):
    x, w1, w2, weights, ids = make_case(tokens, 128, 8, hidden, inter, dtype, seed=tokens,
                                        idle_nan=tokens <= 7, device="cuda")
    out = fused_moe_triton(x, w1, w2, weights, ids)
    ref = reference.fused_moe(x, w1, w2, weights, ids)
    assert torch.isfinite(out).all()
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol["atol"] * ref.abs().max(),
                               rtol=tol["rtol"])


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 256, 4096])
def test_route_kernel_matches_reference_gpu(tokens):
    from vlmdeploy.kernels.moe_route_kernel import moe_route_triton

    logits = torch.randn(tokens, 128, device="cuda", dtype=torch.bfloat16) * 3
    w, ids = moe_route_triton(logits, 8, True)
    w_ref, ids_ref = reference.moe_route(logits, 8, True)
    # bf16 logits tie often (128 experts, 8 mantissa bits), and torch.topk breaks ties in no set
    # order on the GPU: each slot must hold an expert with the reference's logit and weight, and
    # no expert twice
    torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=1e-5)
    picked = logits.gather(1, ids.long())
    assert torch.equal(picked, logits.gather(1, ids_ref.long()))
    assert (ids.sort(dim=1).values.diff(dim=1) > 0).all()
    assert (picked.diff(dim=1) <= 0).all()  # largest first


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 7, 256, 2048])
@pytest.mark.parametrize("inter,rank0", [(2880, True), (1440, True), (1440, False)])
def test_gpt_oss_triton_matches_reference_gpu(tokens, inter, rank0):
    """InternVL3.5-GPT-OSS-20B-A4B's experts (32 of width 2880, top-4, bf16), whole and as one
    rank's half at tp = 2 (rank 1: no down bias)."""
    x, experts, weights, ids = make_gpt_oss_case(tokens, 32, 4, 2880, inter, torch.bfloat16,
                                                 seed=tokens, idle_nan=tokens <= 7,
                                                 device="cuda")
    args, kwargs = gpt_oss_args(x, experts, weights, ids, down_bias=rank0)
    out = fused_moe_triton(*args, **kwargs)
    ref = reference.fused_moe(*args, **kwargs)
    assert torch.isfinite(out).all()
    tol = TOL[torch.bfloat16]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol["atol"] * ref.abs().max(),
                               rtol=tol["rtol"])


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 256, 4096])
def test_route_kernel_topk_then_softmax_matches_reference_gpu(tokens):
    from vlmdeploy.kernels.moe_route_kernel import moe_route_triton

    logits = torch.randn(tokens, 32, device="cuda", dtype=torch.bfloat16) * 3
    w, ids = moe_route_triton(logits, 4, False, topk_then_softmax=True)
    w_ref, ids_ref = reference.moe_route(logits, 4, False, topk_then_softmax=True)
    # as above: bf16 ties may be broken either way, but each slot's logit and weight must match
    torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=1e-5)
    picked = logits.gather(1, ids.long())
    assert torch.equal(picked, logits.gather(1, ids_ref.long()))
    assert (ids.sort(dim=1).values.diff(dim=1) > 0).all()
    assert (picked.diff(dim=1) <= 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 16, 32])  # 32 tokens × 8 = SMALL_ALIGN_PAIRS, its limit
def test_one_program_align_equals_sorting_gpu(tokens):
    ids = random_ids(tokens, 8, 128, seed=tokens).cuda()
    n = tokens * 8
    blocks = triton.cdiv(n + min(n, 128) * 15, 16)
    small = _moe_align_small(ids, 128, 16, blocks)
    ref = _moe_align_sorted(ids, 128, 16, blocks)
    assert torch.equal(small[0], ref[0]) and torch.equal(small[1], ref[1])


def test_the_one_program_align_refuses_batches_past_its_limit():
    # its (pairs × pairs) rank matrix is a quadratic tile: past the limit it would compile and
    # run for minutes on a GPU
    ids = random_ids(SMALL_ALIGN_PAIRS // 8 + 1, 8, 128, seed=0)
    with pytest.raises(ValueError, match="at most"):
        _moe_align_small(ids, 128, 16, 1024)
