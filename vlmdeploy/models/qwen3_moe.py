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
from vlmdeploy.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from vlmdeploy.layers.moe import SparseMoeBlock
from vlmdeploy.layers.norm import RMSNorm
from vlmdeploy.models.qwen3 import (
    Qwen3Attention,
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
    """Qwen3's layer (its ``forward``) with a sparse MLP where the config says so."""

    def __init__(self, cfg: TextConfig, layer: int):
        nn.Module.__init__(self)
        self.self_attn = Qwen3Attention(cfg)
        self.mlp = sparse_moe_block(cfg) if cfg.is_sparse_layer(layer) else Qwen3MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen3MoeModel(Qwen3Model):
    def __init__(self, cfg: TextConfig):
        nn.Module.__init__(self)
        self.cfg = cfg
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen3MoeDecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    def __init__(self, cfg: TextConfig):
        nn.Module.__init__(self)
        self.model = Qwen3MoeModel(cfg)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size)
