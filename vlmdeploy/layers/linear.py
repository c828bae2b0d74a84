"""Tensor-parallel linear layers (Megatron style) and the shard declarations the loader reads.

A column-parallel layer holds this rank's output rows: each rank computes its slice of ``y`` and
nothing is exchanged (attention works on its own heads, the MLP on its own slice of the
intermediate). A row-parallel layer holds the matching input columns: each rank's product is a
partial sum of ``y``, and one all-reduce completes it. A block of attention or MLP thus costs one
all-reduce.

Both are ``nn.Linear`` subclasses, so ``.weight`` stays a plain parameter that fused kernels read
directly; their quantised twins (:mod:`vlmdeploy.quant.linear`) hold a format's parameters
instead, and the fused paths ask ``is_quantized`` before reading a weight. Each declares in
``shard_layouts`` (parameter leaf → :class:`ShardLayout`) which rows of which checkpoint tensor it
holds, so the loader reads only those. At ``tp_size() == 1`` every shard is the whole tensor and
``forward`` is ``nn.Linear``'s own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlmdeploy.distributed.state import all_reduce, tp_rank, tp_size


@dataclass(frozen=True)
class Shard:
    """Rows ``[start, start + size)`` of a checkpoint tensor that is ``full`` long along the
    sharded dimension (for a fused parameter: of one of its parts, e.g. ``k_proj``)."""

    full: int
    start: int
    size: int

    @classmethod
    def even(cls, full: int) -> Shard:
        """This rank's ``1/tp`` of ``full``."""
        tp = tp_size()
        if full % tp:
            raise ValueError(f"{full} rows do not split evenly over {tp} tensor-parallel ranks")
        size = full // tp
        return cls(full, tp_rank() * size, size)

    @classmethod
    def whole(cls, full: int) -> Shard:
        return cls(full, 0, full)

    @property
    def is_whole(self) -> bool:
        return self.start == 0 and self.size == self.full


@dataclass(frozen=True)
class ShardLayout:
    """Along ``dim`` a parameter holds ``parts``, one after another: one part, or one per
    checkpoint tensor it fuses (q, k, v). Rows after the parts are padding, zero."""

    dim: int
    parts: tuple[Shard, ...]

    @property
    def full(self) -> int:
        """Length along ``dim`` of the fused checkpoint tensor (all parts whole)."""
        return sum(p.full for p in self.parts)

    @property
    def local(self) -> int:
        return sum(p.size for p in self.parts)

    @property
    def is_sharded(self) -> bool:
        """Whether this rank holds less than the whole tensor."""
        return not all(p.is_whole for p in self.parts)


class ColumnParallelLinear(nn.Linear):
    """``y = x Wᵀ + b`` for this rank's rows of ``W`` (and ``b``): ``y`` comes out sliced.

    ``parts``: the full output width (split evenly), or one :class:`Shard` per fused part (each
    part's rows of this rank, stacked in order: q, k, v or gate, up)."""

    def __init__(self, in_features: int, parts: int | Sequence[Shard], bias: bool = False):
        parts = (Shard.even(parts),) if isinstance(parts, int) else tuple(parts)
        layout = ShardLayout(0, parts)
        super().__init__(in_features, layout.local, bias=bias)
        self.shard_layouts = {"weight": layout, **({"bias": layout} if bias else {})}


class RowParallelLinear(nn.Linear):
    """``y = all_reduce(x W_rᵀ) + b``: ``x`` comes in sliced (this rank's columns of ``W``), ``y``
    comes out whole on every rank. The bias is added once, after the reduction."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        shard = Shard.even(in_features)
        super().__init__(shard.size, out_features, bias=bias)
        self.tp_size = tp_size()
        self.shard_layouts = {"weight": ShardLayout(1, (shard,))}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return super().forward(x)
        y = all_reduce(F.linear(x, self.weight))  # partial sums over this rank's inputs
        return y if self.bias is None else y + self.bias


def shard_layout(module: nn.Module, leaf: str) -> ShardLayout | None:
    """The layout ``module`` declares for its parameter ``leaf`` (None: not declared)."""
    return getattr(module, "shard_layouts", {}).get(leaf)
