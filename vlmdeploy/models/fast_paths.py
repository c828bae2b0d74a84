"""Speed applied from outside the model files: :func:`apply_fast_paths` rewires a built model in
place so that it computes the same function through fused kernels.

* **Vision encoder**: the layer loop becomes a chain in which each residual update with its layer
  scale runs in one pass with the norm that follows it (:func:`kernels.scaled_add_norm`: ``norm2``
  after the attention's update, the next layer's ``norm1`` after the MLP's). A layer takes the
  stream and its ``norm1`` and hands on the stream and the next layer's ``norm1``; only the last
  layer's update is a plain ``addcmul``. The norm needs the stream the update has just written:
  in one pass it is still in registers, where separate kernels would read the (N, 1025, C)
  stream back and pay a launch each.
* **Steps of a few tokens** (at most :data:`ROW_PATH_TOKENS`: small-batch decode): each Qwen3
  projection is one :func:`kernels.linear_row` with the RMSNorm before it, the SiLU-and-mul before
  ``down`` or the residual add after it fused in. Such a step is bound by reading the weights, and
  the small ops between the GEMMs would otherwise each cost a launch. The stream comes out of each
  layer already summed, so no residual travels beside it. A Qwen3-MoE layer's sparse MLP runs as
  on the general path (its norm, then :func:`kernels.fused_moe`, which reads only the chosen
  experts), its attention on the row path.
* **The lm_head of one row** is a ``linear_row`` too: a matrix-vector kernel that streams the head
  once, with no split-K reduction after it.
* **Quantised projections** (:mod:`vlmdeploy.quant`: FP8 or 4-bit weights) keep their own GEMM on
  the row path; the RMSNorm, the SiLU-and-mul and the residual add run beside it, unfused.

Tensor parallel: a row-parallel projection's product is a partial sum, so beyond one rank the
residual add cannot ride in ``linear_row``: the sum is all-reduced first, then added. One rank's
lm_head logits are all-gathered like the plain head's.

Each transform swaps a module's class for a subclass that overrides one method (as
``torch.nn.utils.parametrize`` does): parameters, their names, the loader's shard declarations
and the KV-cache views stay as they are, and no wrapper module adds a call. The overrides branch
on shapes only, so CUDA graphs capture them like the plain model. On the CPU every fused op runs
its PyTorch reference, which composes the unfused ops, so the plain and the transformed model
agree to rounding (``tests/models/test_fast_paths.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from vlmdeploy import kernels
from vlmdeploy.distributed.state import all_reduce
from vlmdeploy.layers.linear import RowParallelLinear
from vlmdeploy.layers.moe import SparseMoeBlock
from vlmdeploy.layers.norm import norm_params
from vlmdeploy.models.gpt_oss import GptOssForCausalLM
from vlmdeploy.models.internvit import VisionEncoder, VisionLayer
from vlmdeploy.models.internvl import InternVLForCausalLM
from vlmdeploy.models.qwen3 import Qwen3DecoderLayer, Qwen3ForCausalLM, Qwen3Model
from vlmdeploy.models.qwen3_moe import Qwen3MoeForCausalLM, Qwen3MoeModel
from vlmdeploy.quant.linear import is_quantized

# Steps of up to this many tokens take the row path. Up to here linear_row (one row: a
# matrix-vector kernel; more: a tensor-core kernel that reads each weight tile once for all rows)
# beats cuBLAS and drops its split-K reductions; above it cuBLAS stays, where the two were not
# compared (docs/results.csv).
ROW_PATH_TOKENS = 16


def apply_fast_paths(model: InternVLForCausalLM) -> InternVLForCausalLM:
    """Rewire ``model`` in place and return it; applying it again changes nothing."""
    _swap(model.vision_model.encoder, VisionEncoder, FusedNormVisionEncoder)
    if isinstance(model.language_model, GptOssForCausalLM):
        return model  # GPT-OSS stays on its plain path (no row path for it yet)
    if isinstance(model.language_model, Qwen3MoeForCausalLM):
        _swap(model.language_model.model, Qwen3MoeModel, RowPathQwen3MoeModel)
        _swap(model.language_model, Qwen3MoeForCausalLM, RowPathQwen3MoeForCausalLM)
    else:
        _swap(model.language_model.model, Qwen3Model, RowPathQwen3Model)
        _swap(model.language_model, Qwen3ForCausalLM, RowPathQwen3ForCausalLM)
    return model


def _swap(module: nn.Module, plain: type[nn.Module], fast: type[nn.Module]) -> None:
    if type(module) is plain:
        module.__class__ = fast
    elif type(module) is not fast:
        raise TypeError(f"no fast path for {type(module).__name__}")


# ------------------------------------------------------------------------------ vision encoder


class FusedNormVisionEncoder(VisionEncoder):
    """InternViT's encoder with each residual update run in one pass with the norm after it."""

    def forward(self, x: torch.Tensor, num_layers: int) -> torch.Tensor:
        layers = self.layers[:num_layers]
        if not len(layers):
            return x
        _, normed = add_norm(x, None, None, layers[0].norm1)
        for i, layer in enumerate(layers):
            next_norm = layers[i + 1].norm1 if i + 1 < len(layers) else None
            x, normed = fused_vision_layer(layer, x, normed, next_norm)
        return x


def fused_vision_layer(
    layer: VisionLayer, x: torch.Tensor, normed: torch.Tensor, next_norm: nn.Module | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x``, the stream (N, T, C), and ``normed`` = ``layer.norm1(x)`` → the stream after the
    layer and ``next_norm`` of it (None without ``next_norm``)."""
    h, normed = add_norm(x, layer.attn(normed), layer.ls1, layer.norm2)
    y = layer.mlp(normed)
    if next_norm is None:
        return torch.addcmul(h, y, layer.ls2), None  # x + y * ls: one pass, one rounding
    return add_norm(h, y, layer.ls2, next_norm)


def add_norm(
    x: torch.Tensor, y: torch.Tensor | None, scale: torch.Tensor | None, norm: nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + y * scale`` (``x`` without ``y``) → ``(h, norm(h))``, in one fused op."""
    return kernels.scaled_add_norm(x, y, scale, *norm_params(norm))


# ------------------------------------------------------------------------------ language model


class RowPathQwen3Model(Qwen3Model):
    """Qwen3 whose steps of at most :data:`ROW_PATH_TOKENS` tokens take :func:`forward_row`."""

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # Every layer of a step sees the same token count, so the path is chosen once per step.
        if inputs_embeds.shape[0] > ROW_PATH_TOKENS:
            return Qwen3Model.forward(self, inputs_embeds, positions)  # (shared with MoE)
        cos, sin = self.rope(positions, inputs_embeds.dtype)
        h = inputs_embeds  # (T, H): the stream itself; each layer adds its updates to it
        for layer in self.layers:
            h = forward_row(layer, h, cos, sin)
        return self.norm(h)


def forward_row(
    layer: Qwen3DecoderLayer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """One decoder layer over a few tokens: the stream ``h`` (T, H) → the stream after it. Every
    projection is one :func:`kernels.linear_row` with the RMSNorm before it, the SiLU-and-mul
    before ``down`` or the residual add after it (a quantised one: its own GEMM, those beside
    it)."""
    attn, mlp = layer.self_attn, layer.mlp
    norm1, norm2 = layer.input_layernorm, layer.post_attention_layernorm
    qkv = norm_linear_row(h, attn.qkv_proj, norm1)  # (T, q + 2 kv)
    h = add_row_parallel(attn.attend(qkv, cos, sin), attn.o_proj, h)
    if isinstance(mlp, SparseMoeBlock):  # the experts' own fused op, after its norm
        return h + mlp(norm2(h))
    gate_up = norm_linear_row(h, mlp.gate_up_proj, norm2)
    return add_row_parallel(gate_up, mlp.down_proj, h, silu_mul=True)


def norm_linear_row(x: torch.Tensor, proj: nn.Linear, norm: nn.Module) -> torch.Tensor:
    """``proj(norm(x))`` with the RMSNorm fused into the kernel (a quantised ``proj``: its own
    GEMM after the norm)."""
    if is_quantized(proj):
        return proj(norm(x))
    return kernels.linear_row(x, proj.weight, norm.weight, norm.eps)


def add_row_parallel(
    x: torch.Tensor, proj: RowParallelLinear, residual: torch.Tensor, silu_mul: bool = False
) -> torch.Tensor:
    """``residual + proj(x)`` (``x`` through SiLU-and-mul first with ``silu_mul``). On one rank
    the add is fused into the kernel; beyond, each rank's product is a partial sum, reduced
    before the residual (whole on every rank) is added. A quantised ``proj`` runs its own GEMM
    (and reduction) between the two."""
    if is_quantized(proj):
        return residual + proj(kernels.silu_and_mul(x) if silu_mul else x)
    if proj.tp_size == 1:
        return kernels.linear_row(x, proj.weight, silu_mul=silu_mul, residual=residual)
    return all_reduce(kernels.linear_row(x, proj.weight, silu_mul=silu_mul)) + residual


class RowPathQwen3ForCausalLM(Qwen3ForCausalLM):
    """The lm_head of a single row through :func:`kernels.linear_row`."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[0] == 1:  # a matrix-vector kernel streams the (V, H) head once
            return self.lm_head.gather(kernels.linear_row(hidden, self.lm_head.weight))
        return Qwen3ForCausalLM.compute_logits(self, hidden)  # (shared with MoE)


class RowPathQwen3MoeModel(Qwen3MoeModel):
    """Qwen3-MoE on the row path: attention and dense MLPs as in :class:`RowPathQwen3Model`, each
    sparse MLP through :func:`kernels.fused_moe` (which reads only the chosen experts)."""

    forward = RowPathQwen3Model.forward


class RowPathQwen3MoeForCausalLM(Qwen3MoeForCausalLM):
    compute_logits = RowPathQwen3ForCausalLM.compute_logits
