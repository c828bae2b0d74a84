"""Blocked FP8 weights: ``weight`` (N, K) in ``float8_e4m3fn`` and ``weight_scale_inv`` (ceil(N /
128), ceil(K / 128)) float32, one scale per 128 × 128 block; the names and layout of Qwen3-FP8's
and DeepSeek-V3's checkpoints, so their tensors load as they are. A full-precision checkpoint
tensor is quantised as it loads (:meth:`Fp8Method.writer`): each rank quantises only its slice, on
the device, so a full-precision copy of the model never exists.

FP8 tensors that reach a parameter kept in full precision (a vision tower or lm_head a checkpoint
quantised) are dequantised on load (:class:`PendingDequant`).
"""

from __future__ import annotations

import torch
from torch import nn

from vlmdeploy import kernels
from vlmdeploy.kernels.quant_reference import FP8, fp8_dequantize_blocks, fp8_quantize_blocks
from vlmdeploy.layers.linear import ShardLayout
from vlmdeploy.models.mxfp4 import TensorSource
from vlmdeploy.quant.linear import QuantMethod, Writer, cut_blocks, new_param

SCALE_SUFFIX = "_scale_inv"  # "<name>.weight" → "<name>.weight_scale_inv"
FP8_DTYPES = ("F8_E4M3",)  # safetensors' name of float8_e4m3fn


class Fp8Method(QuantMethod):
    def __init__(self, block: tuple[int, int] = (128, 128)):
        self.block = tuple(block)

    def create(self, layer: nn.Linear, name: str) -> None:
        layout = layer.shard_layouts["weight"]  # rows (column-parallel) or columns (row-parallel)
        dim, size = layout.dim, self.block[layout.dim]
        last = len(layout.parts) - 1
        parts = tuple(cut_blocks(p, size, i == last, f"{name} (FP8 blocks along dim {dim})")
                      for i, p in enumerate(layout.parts))
        n, k = layer.out_features, layer.in_features
        grid = [-(-n // self.block[0]), -(-k // self.block[1])]
        grid[dim] = sum(p.size for p in parts)
        like = layer.weight
        del layer.weight
        layer.weight = new_param((n, k), FP8, like)
        layer.weight_scale_inv = new_param(tuple(grid), torch.float32, like)
        layer.shard_layouts = {**layer.shard_layouts, "weight_scale_inv": ShardLayout(dim, parts)}

    def apply(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return kernels.fp8_linear(x, layer.weight, layer.weight_scale_inv, self.block)

    @torch.no_grad()
    def quantize(self, layer: nn.Linear, weight: torch.Tensor) -> None:
        q, s = fp8_quantize_blocks(weight, self.block)
        layer.weight.copy_(q)
        layer.weight_scale_inv.copy_(s)

    def writer(self, layer: nn.Linear, leaf: str, src_dtype: str) -> tuple[Writer, str] | None:
        if leaf != "weight" or src_dtype in FP8_DTYPES:
            return None  # FP8 weights and their scales load as they are
        scale, block = layer.weight_scale_inv.data, self.block

        def write(weight: torch.Tensor, dim: int, offset: int, piece: torch.Tensor) -> None:
            # the piece starts on a block boundary (create checked the parts), so its own blocks
            # are the checkpoint tensor's
            q, s = fp8_quantize_blocks(piece.to(weight.device), block)
            weight.narrow(dim, offset, piece.shape[dim]).copy_(q)
            scale.narrow(dim, offset // block[dim], s.shape[dim]).copy_(s)

        return write, "weight" + SCALE_SUFFIX


class PendingDequant:
    """FP8 checkpoint tensors bound for full-precision parameters, held until their
    ``weight_scale_inv`` arrives (in any order and file), then dequantised."""

    def __init__(self, block: tuple[int, int] = (128, 128)):
        self.block = tuple(block)
        self._pending: dict[str, dict[str, torch.Tensor]] = {}

    def add(self, name: str, tensor: torch.Tensor) -> tuple[str, TensorSource] | None:
        """Take a weight or its scales; once both of ``<base>.weight`` are in, ``(its name, the
        dequantised float32 weight)``, else None."""
        is_scale = name.endswith(SCALE_SUFFIX)
        base = name.removesuffix(SCALE_SUFFIX) if is_scale else name
        halves = self._pending.setdefault(base, {})
        key = "scale" if is_scale else "weight"
        if key in halves:
            raise ValueError(f"tensor {name!r} appears twice")
        halves[key] = tensor
        if len(halves) < 2:
            return None
        del self._pending[base]
        weight = fp8_dequantize_blocks(halves["weight"], halves["scale"], self.block)
        return base, TensorSource(weight)

    def unpaired(self) -> list[str]:
        return [base + ("" if "weight" in h else SCALE_SUFFIX) for base, h in self._pending.items()]
