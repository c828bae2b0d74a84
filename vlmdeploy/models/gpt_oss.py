"""GPT-OSS decoder (the language model of InternVL3.5-GPT-OSS-20B-A4B), over packed token batches.

Per layer: ``h = x + o_proj(attn(rope(q), rope(k), v))``; ``out = h + moe(h)``, both halves
pre-normed with RMSNorm. What differs from Qwen3:

* attention: biases on q/k/v/o, no q/k norm, a learned **sink** logit per head in the softmax,
  and a **sliding window** on the layers ``layer_types`` names ``sliding_attention`` (the others
  see the whole context); RoPE with **YaRN** (:mod:`vlmdeploy.layers.rotary`).
* MLP: a mixture of experts. The router (a biased linear) picks the top-k experts by logit and
  weighs them by a softmax over those k logits only. Each expert is a biased gate/up projection,
  GPT-OSS's clamped SwiGLU — ``gate = min(gate, limit)``, ``up = clamp(up, ±limit)``,
  ``(up + 1) · gate · σ(alpha · gate)`` — and a biased down projection.

Expert weights keep the checkpoint's layout (transformers' ``GptOssExperts``): ``gate_up_proj``
(E, H, 2I) with gate and up **interleaved** along the last dimension (column 2j is gate j, 2j + 1
is up j), ``down_proj`` (E, I, H), both applied as ``x @ W``. Router and experts run as the fused
ops Qwen3-MoE uses (:func:`kernels.moe_route`, :func:`kernels.fused_moe`) with GPT-OSS's switches:
only the chosen experts are read, and nothing waits for the host, so CUDA graphs capture the
model.

Tensor parallel: heads (and their sinks) split over the ranks, o_proj row-parallel; every rank
holds every expert's slice of the intermediate dimension — a contiguous run of the interleaved
gate/up columns and the matching rows of ``down_proj`` — and one all-reduce after the combine
completes the layer's MLP. Rank 0 alone adds the down biases, so the reduction counts them once.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmdeploy import kernels
from vlmdeploy.config import TextConfig
from vlmdeploy.distributed.state import all_reduce, tp_rank, tp_size
from vlmdeploy.kernels.reference import ClampedSwiGLU, apply_rope
from vlmdeploy.layers.attention import PagedAttention
from vlmdeploy.layers.linear import ColumnParallelLinear, RowParallelLinear, Shard, ShardLayout
from vlmdeploy.layers.rotary import YarnRotary
from vlmdeploy.models.qwen3 import Qwen3DecoderLayer, Qwen3ForCausalLM, Qwen3Model
from vlmdeploy.models.tp_plan import local_kv_heads, qkv_shards


class GptOssAttention(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        tp = tp_size()
        self.num_heads, self.num_kv_heads, self.head_dim = (  # this rank's heads
            cfg.num_heads // tp,
            local_kv_heads(cfg.num_kv_heads, tp),
            cfg.head_dim,
        )
        self.q_size = self.num_heads * cfg.head_dim
        self.kv_size = self.num_kv_heads * cfg.head_dim
        bias = cfg.attention_bias
        self.qkv_proj = ColumnParallelLinear(
            cfg.hidden_size, qkv_shards(cfg, tp, tp_rank()), bias=bias
        )
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=bias)
        self.sinks = nn.Parameter(torch.zeros(self.num_heads))  # this rank's heads' sinks
        self.shard_layouts = {"sinks": ShardLayout(0, (Shard.even(cfg.num_heads),))}
        self.attn = PagedAttention(
            self.num_heads,
            self.num_kv_heads,
            cfg.head_dim,
            cfg.head_dim**-0.5,
            window=cfg.layer_window(layer),
        )

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rope(q.view(-1, self.num_heads, self.head_dim), cos, sin)  # (T, Hq, D)
        k = apply_rope(k.view(-1, self.num_kv_heads, self.head_dim), cos, sin)  # (T, Hkv, D)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        o = self.attn(q, k, v, sinks=self.sinks)  # (T, Hq, D)
        return self.o_proj(o.flatten(1))


class GptOssExperts(nn.Module):
    """E experts of this rank's intermediate slice; ``forward`` computes the weighted sum of the
    chosen experts' outputs."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        e, h = cfg.num_experts, cfg.hidden_size
        self.num_experts = e
        inter = Shard.even(cfg.intermediate_size)  # this rank's slice of every expert
        gate_up = Shard.even(2 * cfg.intermediate_size)  # = its gate/up column pairs
        self.gate_up_proj = nn.Parameter(torch.empty(e, h, gate_up.size))
        self.gate_up_proj_bias = nn.Parameter(torch.empty(e, gate_up.size))
        self.down_proj = nn.Parameter(torch.empty(e, inter.size, h))
        self.down_proj_bias = nn.Parameter(torch.empty(e, h))
        self.shard_layouts = {
            "gate_up_proj": ShardLayout(2, (gate_up,)),
            "gate_up_proj_bias": ShardLayout(1, (gate_up,)),
            "down_proj": ShardLayout(1, (inter,)),
        }
        self.activation = ClampedSwiGLU(cfg.swiglu_alpha, cfg.swiglu_limit)
        self.tp_size = tp_size()
        self.adds_down_bias = tp_rank() == 0  # the all-reduce sums the ranks: the bias once

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x (T, H), weights and ids (T, k) → Σ_j weights[t, j] · expert_ids[t, j](x_t), (T, H),
        whole on every rank."""
        y = kernels.fused_moe(
            x,
            self.gate_up_proj.transpose(1, 2),  # (E, 2I, H) views: the op's F.linear orientation
            self.down_proj.transpose(1, 2),
            weights,
            ids,
            gate_up_bias=self.gate_up_proj_bias,
            down_bias=self.down_proj_bias if self.adds_down_bias else None,
            interleaved=True,
            activation=self.activation,
        )
        return y if self.tp_size == 1 else all_reduce(y)


class GptOssMLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.router = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=True)  # replicated
        self.experts = GptOssExperts(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = kernels.moe_route(  # (T, k) each: the top-k logits, a softmax over them
            self.router(x), self.top_k, renormalize=False, topk_then_softmax=True
        )
        return self.experts(x, weights, ids)


class GptOssDecoderLayer(Qwen3DecoderLayer):
    """Qwen3's layer (its norms and ``forward``) with GPT-OSS's attention and experts."""

    @staticmethod
    def attention(cfg: TextConfig, layer: int) -> nn.Module:
        return GptOssAttention(cfg, layer)

    @staticmethod
    def mlp_of(cfg: TextConfig, layer: int) -> nn.Module:
        return GptOssMLP(cfg)


class GptOssModel(Qwen3Model):
    """Qwen3's model with YaRN RoPE where the config asks for it."""

    layer_type = GptOssDecoderLayer

    def __init__(self, cfg: TextConfig):
        super().__init__(cfg)
        self.rotary = (
            YarnRotary(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
            if cfg.rope_scaling is not None
            else None
        )

    def rope(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rotary is None:
            return super().rope(positions, dtype)
        return self.rotary(positions, dtype)


class GptOssForCausalLM(Qwen3ForCausalLM):
    model_type = GptOssModel
