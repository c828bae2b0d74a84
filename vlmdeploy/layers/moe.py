"""Mixture-of-experts layers: the experts as fused 3-D parameters, and a softmax-routed sparse
MLP block over them (Qwen3-MoE's).

Tokens reach their experts through one fused op (:func:`vlmdeploy.kernels.fused_moe`): pairs of
(token, chosen expert) grouped by expert, a grouped GEMM for gate-up with SwiGLU, one for down,
and the routing weights applied as the k outputs of a token are summed. Only the experts that
have tokens are read, so a decode step of a few tokens reads ``k`` experts per token, not all.

Tensor parallel: every expert is split along its intermediate width, as a dense MLP is (gate/up
column-parallel, down row-parallel). Each rank's combine is then a partial sum of the output, and
one all-reduce after it completes the block. The router is replicated.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmdeploy import kernels
from vlmdeploy.distributed.state import all_reduce, tp_size
from vlmdeploy.layers.linear import Shard, ShardLayout


class FusedMoE(nn.Module):
    """``num_experts`` SwiGLU experts of width ``intermediate_size``, stored fused:
    ``gate_up_proj`` (E, 2·I_local, H), each expert's gate rows then its up rows, and
    ``down_proj`` (E, H, I_local) — the orientation of transformers' ``Qwen3MoeExperts``, so a
    fused checkpoint tensor loads as it is. ``I_local`` is this rank's slice of the width."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        shard = Shard.even(intermediate_size)
        self.num_experts = num_experts
        self.tp_size = tp_size()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * shard.size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, shard.size))
        # Dims count the expert dim: the loader reads a per-expert tensor into one expert's slice.
        self.shard_layouts = {
            "gate_up_proj": ShardLayout(1, (shard, shard)),
            "down_proj": ShardLayout(2, (shard,)),
        }

    def forward(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        """x (T, H), each token's ``k`` routing weights and expert ids (T, k) → (T, H), whole on
        every rank."""
        y = kernels.fused_moe(x, self.gate_up_proj, self.down_proj, topk_weights, topk_ids)
        return y if self.tp_size == 1 else all_reduce(y)


class SparseMoeBlock(nn.Module):
    """Softmax router over ``num_experts`` experts, the ``top_k`` most probable per token
    (rescaled to sum to one with ``renormalize``), their SwiGLU outputs summed with those
    weights. Checkpoint names: ``gate.weight`` (E, H) for the router, ``experts.*`` for
    :class:`FusedMoE`."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        intermediate_size: int,
        renormalize: bool,
    ):
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in 1..{num_experts} (the experts)")
        self.top_k, self.renormalize = top_k, renormalize
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)  # the router, replicated
        self.experts = FusedMoE(num_experts, hidden_size, intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = kernels.moe_route(self.gate(x), self.top_k, self.renormalize)  # (T, k)
        return self.experts(x, weights, ids)
