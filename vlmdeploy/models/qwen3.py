"""Qwen3 dense decoder (the language model of InternVL3.5 1B–38B), over packed token batches.

Per layer: ``h = x + o_proj(attn(rope(qk_norm(q, k)), v))``; ``out = h + down(silu(gate) * up)``,
both halves pre-normed with RMSNorm. q/k/v and gate/up are fused projections; the loader fills their
row blocks. The residual stream travels beside the layer outputs un-normed, so each RMSNorm adds it
in the same op (``norm(x + residual)``, returning the sum as the next residual).

Tensor parallel (Megatron): each rank builds its shard, as :mod:`vlmdeploy.models.tp_plan` splits
it. qkv and gate/up are column-parallel (this rank's heads, its slice of the intermediate), o_proj
and down row-parallel (one all-reduce each), the vocabulary split in the embedding and the head.
At one rank every layer is the plain one.

This file is the model as published. The engine runs it through
:func:`vlmdeploy.models.fast_paths.apply_fast_paths`, which gives steps of a few tokens a path
where each projection is one ``linear_row`` with its neighbours fused; both compute the same
function.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmdeploy import kernels
from vlmdeploy.config import TextConfig
from vlmdeploy.distributed.state import tp_rank, tp_size
from vlmdeploy.layers.attention import PagedAttention
from vlmdeploy.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from vlmdeploy.layers.linear import ColumnParallelLinear, RowParallelLinear, Shard
from vlmdeploy.layers.norm import RMSNorm
from vlmdeploy.models.tp_plan import local_kv_heads, qkv_shards


class Qwen3Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        tp = tp_size()
        self.num_heads, self.num_kv_heads, self.head_dim = (  # this rank's heads
            cfg.num_heads // tp,
            local_kv_heads(cfg.num_kv_heads, tp),
            cfg.head_dim,
        )
        self.q_size = self.num_heads * cfg.head_dim
        self.kv_size = self.num_kv_heads * cfg.head_dim
        self.qkv_proj = ColumnParallelLinear(cfg.hidden_size, qkv_shards(cfg, tp, tp_rank()))
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.attn = PagedAttention(
            self.num_heads, self.num_kv_heads, cfg.head_dim, cfg.head_dim**-0.5
        )

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.attend(self.qkv_proj(x), cos, sin))

    def attend(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The fused q/k/v projection's output (T, q + 2 kv) → attention output (T, q)."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)  # (T, Hq, D)
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        norm_rope = (self.q_norm.weight, self.k_norm.weight, cos, sin, self.q_norm.eps)
        return self.attn(q, k, v, norm_rope).flatten(1)  # (T, Hq * D)


class Qwen3MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(
                f"unsupported hidden_act {cfg.hidden_act!r} for Qwen3 (expected 'silu')"
            )
        self.gate_up_proj = ColumnParallelLinear(
            cfg.hidden_size, [Shard.even(cfg.intermediate_size)] * 2
        )
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(kernels.silu_and_mul(self.gate_up_proj(x)))


class Qwen3DecoderLayer(nn.Module):
    """Pre-norm attention and MLP. The decoders built on Qwen3's (Qwen3-MoE, GPT-OSS) change only
    what :meth:`attention` and :meth:`mlp` make for layer ``layer``."""

    def __init__(self, cfg: TextConfig, layer: int = 0):
        super().__init__()
        self.self_attn = self.attention(cfg, layer)
        self.mlp = self.mlp_of(cfg, layer)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    @staticmethod
    def attention(cfg: TextConfig, layer: int) -> nn.Module:
        return Qwen3Attention(cfg)

    @staticmethod
    def mlp_of(cfg: TextConfig, layer: int) -> nn.Module:
        return Qwen3MLP(cfg)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` (T, H) and ``residual``, whose sum is the stream (``residual`` None: ``x`` is)
        → the same pair after this layer. The sum is left to the next norm, which fuses it."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, cos, sin)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class Qwen3Model(nn.Module):
    layer_type: type[Qwen3DecoderLayer] = Qwen3DecoderLayer

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(self.layer_type(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """inputs_embeds: (T, H); positions: (T,) → hidden states (T, H)."""
        cos, sin = self.rope(positions, inputs_embeds.dtype)
        x, residual = inputs_embeds, None
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin)
        return self.norm(x) if residual is None else self.norm(x, residual)[0]

    def rope(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary tables (cos, sin) of ``positions``, shared by every layer of a step."""
        return kernels.rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, dtype)


class Qwen3ForCausalLM(nn.Module):
    model_type: type[Qwen3Model] = Qwen3Model

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.model = self.model_type(cfg)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(T, H) → the full logits (T, V), on every rank."""
        return self.lm_head(hidden)
