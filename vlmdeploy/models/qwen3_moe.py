"""Qwen3-MoE decoder (the language model of InternVL3.5-30B-A3B and 241B-A28B).

Qwen3 with the MLP of most layers replaced by a sparse mixture of SwiGLU experts
(:class:`vlmdeploy.layers.moe.SparseMoeBlock`): a softmax router picks ``num_experts_per_tok``
experts per token, their weights renormalised to sum to one when ``norm_topk_prob``. A layer
listed in ``mlp_only_layers``, or off the ``decoder_sparse_step`` grid, keeps Qwen3's dense MLP
(of ``intermediate_size``). Attention, norms, RoPE, embedding and head are Qwen3's.

Tensor parallel as Qwen3, with every expert split along its intermediate width (one all-reduce
after the combine).
"""

from __future__ import annotations

from torch import nn

from vlmdeploy.config import TextConfig
from vlmdeploy.layers.moe import SparseMoeBlock
from vlmdeploy.models.qwen3 import (
    Qwen3DecoderLayer,
    Qwen3ForCausalLM,
    Qwen3MLP,
    Qwen3Model,
)


def sparse_moe_block(cfg: TextConfig) -> SparseMoeBlock:
    if cfg.hidden_act != "silu":
        raise ValueError(
            f"unsupported hidden_act {cfg.hidden_act!r} for Qwen3-MoE (expected 'silu')"
        )
    return SparseMoeBlock(
        cfg.hidden_size,
        cfg.num_experts,
        cfg.num_experts_per_tok,
        cfg.moe_intermediate_size,
        cfg.norm_topk_prob,
    )


class Qwen3MoeDecoderLayer(Qwen3DecoderLayer):
    """Qwen3's layer with a sparse MLP where the config says so."""

    @staticmethod
    def mlp_of(cfg: TextConfig, layer: int) -> nn.Module:
        return sparse_moe_block(cfg) if cfg.is_sparse_layer(layer) else Qwen3MLP(cfg)


class Qwen3MoeModel(Qwen3Model):
    layer_type = Qwen3MoeDecoderLayer


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    model_type = Qwen3MoeModel
