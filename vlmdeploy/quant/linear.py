"""Quantised linear layers, applied to a built model as a transform.

:func:`quantize_linears` swaps each tensor-parallel projection of the language model (the
attention's ``qkv_proj`` and ``o_proj``, the MLP's ``gate_up_proj`` and ``down_proj``: every
:class:`ColumnParallelLinear` and :class:`RowParallelLinear`) for its quantised twin and lets a
:class:`QuantMethod` replace its ``weight`` with the format's parameters. The model files stay as
published; the embedding, the lm_head, the vision tower and the projector keep their dtype.

Run on the meta device before the weights exist, the transform costs no memory, and the loader
then sees the format's tensors as ordinary parameters: each method declares their
``shard_layouts`` from the layer's, so a tensor-parallel rank reads only its slices of
``weight_scale_inv`` or ``qweight`` as it would of a weight. A split that would cut a quantisation
block or group (or a fused part inside one) is refused, naming the layer.

As :mod:`vlmdeploy.models.fast_paths` does, the swap changes a module's class only; the fused row
path asks :func:`is_quantized` and runs a quantised projection through its own GEMM.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from vlmdeploy.distributed.state import TPGroup, all_reduce, tp_size, use_group
from vlmdeploy.layers.linear import ColumnParallelLinear, RowParallelLinear, Shard
from vlmdeploy.quant.spec import WeightQuant

# (param, dim, offset, piece): write a checkpoint tensor's piece into ``param`` at ``offset``
Writer = Callable[[torch.Tensor, int, int, torch.Tensor], None]


class QuantMethod:
    """How a quantised linear layer holds and applies its weight (one instance serves every layer
    of a model)."""

    def create(self, layer: nn.Linear, name: str) -> None:
        """Replace ``layer.weight`` (meta) with this format's parameters and their shard layouts,
        derived from the weight's; raise, naming ``name``, when a shard would cut a block."""
        raise NotImplementedError

    def apply(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """x (T, K) → ``x Wᵀ`` (T, N), this rank's partial product, without the bias."""
        raise NotImplementedError

    def quantize(self, layer: nn.Linear, weight: torch.Tensor) -> None:
        """Fill the parameters from a full-precision local weight (N, K) (dummy weights)."""
        raise NotImplementedError

    def writer(self, layer: nn.Linear, leaf: str, src_dtype: str) -> tuple[Writer, str] | None:
        """For a checkpoint tensor of dtype ``src_dtype`` (safetensors' name) loading into
        parameter ``leaf`` that must be converted: how to write it, and the other parameter that
        writing fills too. None: copied as it is."""
        return None


class QuantColumnParallelLinear(ColumnParallelLinear):
    quant: QuantMethod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.quant.apply(self, x)
        return y if self.bias is None else y + self.bias


class QuantRowParallelLinear(RowParallelLinear):
    quant: QuantMethod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.quant.apply(self, x)
        if self.tp_size > 1:
            y = all_reduce(y)  # partial sums over this rank's inputs
        return y if self.bias is None else y + self.bias


_QUANTIZED = {
    ColumnParallelLinear: QuantColumnParallelLinear,
    RowParallelLinear: QuantRowParallelLinear,
}


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, (QuantColumnParallelLinear, QuantRowParallelLinear))


def make_method(quant: WeightQuant) -> QuantMethod:
    if quant.method == "fp8":
        from vlmdeploy.quant.fp8 import Fp8Method

        return Fp8Method(quant.block)
    if quant.method == "awq":
        from vlmdeploy.quant.awq import AwqMethod

        return AwqMethod(quant.group_size)
    raise ValueError(f"unknown weight quantisation {quant.method!r}")


def quantize_linears(language_model: nn.Module, quant: WeightQuant) -> int:
    """Swap every tensor-parallel linear layer of ``language_model`` for its quantised twin, in
    place; returns how many. Applying it again changes nothing."""
    method, count = make_method(quant), 0
    for name, module in language_model.named_modules():
        twin = _QUANTIZED.get(type(module))
        if twin is None:
            continue
        module.__class__ = twin
        module.quant = method
        method.create(module, name)
        count += 1
    return count


def check_quantized_split(text_cfg, quant: WeightQuant, tp: int) -> None:
    """Raise ValueError, naming the layer, when some rank of ``tp`` would cut a block or group:
    one decoder layer (all are alike) built for every rank on the meta device and quantised.
    The engine asks before any weight is read or any process started."""
    from vlmdeploy.models.qwen3 import Qwen3DecoderLayer

    for rank in range(tp):
        with use_group(TPGroup(rank, tp)), torch.device("meta"):
            quantize_linears(Qwen3DecoderLayer(text_cfg), quant)


def cut_blocks(shard: Shard, block: int, last: bool, what: str) -> Shard:
    """``shard`` (rows of a checkpoint tensor) in units of ``block`` rows. The shard must start on
    a block boundary and hold whole blocks, except that the last part of a layer may end with the
    tensor's partial last block; otherwise a block would straddle two ranks (or two fused parts)
    and no rank could hold its one scale."""
    ends_tensor = last and shard.start + shard.size == shard.full
    if shard.start % block or (shard.size % block and not ends_tensor):
        where = (f"rows {shard.start}..{shard.start + shard.size} of {shard.full}"
                 if not shard.is_whole else f"all {shard.full} rows")
        raise ValueError(
            f"{what} cannot be cut into whole blocks of {block}: this rank holds {where} "
            f"(tensor-parallel size {tp_size()}); a block or group must not straddle two ranks "
            "or two fused projections. Choose a tp that splits it into multiples of the block."
        )
    return Shard(-(-shard.full // block), shard.start // block, -(-shard.size // block))


def new_param(shape: tuple[int, ...], dtype: torch.dtype, like: torch.Tensor) -> nn.Parameter:
    """An uninitialised frozen parameter on ``like``'s device (meta, before the weights exist)."""
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=like.device), requires_grad=False)
