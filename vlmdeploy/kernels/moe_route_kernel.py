"""A router's top-k in one launch: softmax over the experts, the k largest probabilities
(largest first; on a tie the lower expert), rescaled to sum to one when asked; or, with
``topk_then_softmax`` (GPT-OSS, a compile-time switch), the k largest logits weighted by a
softmax over those k alone.

Same contract as :func:`vlmdeploy.kernels.reference.moe_route`, which as torch ops is five or six
launches (softmax, top-k, sum, divide, cast) — a decode step pays them once per layer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _moe_route_kernel(logits_ptr, weights_ptr, ids_ptr, num_experts, stride_l,
                      TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
                      TOPK_THEN_SOFTMAX: tl.constexpr, BLOCK_E: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    mask = cols < num_experts
    x = tl.load(logits_ptr + t * stride_l + cols, mask=mask, other=float("-inf")).to(tl.float32)
    slots = tl.arange(0, BLOCK_K)
    keep = slots < TOP_K
    if TOPK_THEN_SOFTMAX:
        values, ids = _top_k_logits(x, cols, slots, TOP_K, BLOCK_E, BLOCK_K)
        p = tl.where(keep, tl.exp(values - tl.max(x, axis=0)), 0.0)  # the top logit is x's max
        values = p / tl.sum(p, axis=0)  # fp32 softmax over the k, as the reference's
    else:
        p = tl.exp(x - tl.max(x, axis=0))
        probs = p / tl.sum(p, axis=0)  # fp32 softmax, as the reference's
        left = tl.where(mask, probs, -1.0)  # probabilities are >= 0: -1 marks taken or absent
        values = tl.zeros([BLOCK_K], tl.float32)
        ids = tl.zeros([BLOCK_K], tl.int32)
        for j in tl.static_range(TOP_K):
            best = tl.max(left, axis=0)
            idx = tl.min(tl.where(left == best, cols, BLOCK_E), axis=0)  # the lower expert on a tie
            values = tl.where(slots == j, best, values)
            ids = tl.where(slots == j, idx, ids)
            left = tl.where(cols == idx, -1.0, left)
        if RENORMALIZE:
            values = values / tl.sum(values, axis=0)  # the padding slots hold 0
    tl.store(weights_ptr + t * TOP_K + slots, values, mask=keep)
    tl.store(ids_ptr + t * TOP_K + slots, ids, mask=keep)


@triton.jit
def _top_k_logits(x, cols, slots, TOP_K: tl.constexpr, BLOCK_E: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """The TOP_K largest of ``x`` (BLOCK_E,) (absent experts at -inf), largest first, the lower
    expert on a tie: (values, ids), each (BLOCK_K,), padding slots 0."""
    taken = cols >= BLOCK_E  # none yet; logits may be any value, so a mask marks the taken
    values = tl.zeros([BLOCK_K], tl.float32)
    ids = tl.zeros([BLOCK_K], tl.int32)
    for j in tl.static_range(TOP_K):
        left = tl.where(taken, float("-inf"), x)
        best = tl.max(left, axis=0)
        idx = tl.min(tl.where((left == best) & ~taken, cols, BLOCK_E), axis=0)
        values = tl.where(slots == j, best, values)
        ids = tl.where(slots == j, idx, ids)
        taken = taken | (cols == idx)
    return values, ids


def moe_route_triton(logits: torch.Tensor, top_k: int, renormalize: bool,
                     topk_then_softmax: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`vlmdeploy.kernels.reference.moe_route`: router logits (T, E) →
    (weights (T, k) fp32, expert ids (T, k) int32)."""
    t, e = logits.shape
    weights = torch.empty(t, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(t, top_k, dtype=torch.int32, device=logits.device)
    if t == 0:
        return weights, ids
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    _moe_route_kernel[(t,)](logits, weights, ids, e, logits.stride(0), TOP_K=top_k,
                            RENORMALIZE=renormalize, TOPK_THEN_SOFTMAX=topk_then_softmax,
                            BLOCK_E=triton.next_power_of_2(e),
                            BLOCK_K=triton.next_power_of_2(top_k), num_warps=4)
    return weights, ids
