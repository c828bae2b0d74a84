"""AWQ's 4-bit weights in AutoAWQ's GEMM layout: ``qweight`` (K, N / 8) int32, ``qzeros``
(K / G, N / 8) int32, ``scales`` (K / G, N) float16, as AutoAWQ and LMDeploy's ``lite auto_awq``
write them (the packing order: :data:`vlmdeploy.kernels.quant_reference.AWQ_ORDER`). The
parameters keep that layout, so a checkpoint's tensors load as they are, and the W4A16 kernel
reads them directly.

Tensor parallel: a column-parallel layer splits N, in whole packed words (8 columns); a
row-parallel one splits K, in whole groups of G inputs.

:func:`quantize_rtn` is AWQ's quantiser without its calibration (round to nearest, per group,
asymmetric): it makes test checkpoints and dummy weights, not production models.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmdeploy import kernels
from vlmdeploy.kernels.quant_reference import AWQ_ORDER
from vlmdeploy.layers.linear import ShardLayout
from vlmdeploy.quant.linear import QuantMethod, cut_blocks, new_param

PACK = 8  # 4-bit values per int32 word


class AwqMethod(QuantMethod):
    def __init__(self, group_size: int = 128):
        self.group_size = group_size

    def create(self, layer: nn.Linear, name: str) -> None:
        layout = layer.shard_layouts["weight"]
        n, k, g = layer.out_features, layer.in_features, self.group_size
        if layout.dim == 0:  # column-parallel: this rank's output columns, whole words of 8
            if k % g:
                raise ValueError(f"{name}: {k} inputs do not split into AWQ groups of {g}")
            words = tuple(cut_blocks(p, PACK, False, f"{name} (AWQ words of 8 output columns)")
                          for p in layout.parts)
            layouts = {"qweight": ShardLayout(1, words), "qzeros": ShardLayout(1, words),
                       "scales": ShardLayout(1, layout.parts)}
        else:  # row-parallel: this rank's inputs, whole groups
            if n % PACK:
                raise ValueError(f"{name}: {n} outputs do not pack into AWQ words of 8")
            (p,) = layout.parts
            groups = cut_blocks(p, g, False, f"{name} (AWQ groups of {g} inputs)")
            layouts = {"qweight": ShardLayout(0, layout.parts), "qzeros": ShardLayout(0, (groups,)),
                       "scales": ShardLayout(0, (groups,))}
        like = layer.weight
        del layer.weight
        layer.qweight = new_param((k, n // PACK), torch.int32, like)
        layer.qzeros = new_param((k // g, n // PACK), torch.int32, like)
        layer.scales = new_param((k // g, n), torch.float16, like)
        bias = {"bias": layer.shard_layouts["bias"]} if "bias" in layer.shard_layouts else {}
        layer.shard_layouts = {**layouts, **bias}

    def apply(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return kernels.w4a16_linear(x, layer.qweight, layer.qzeros, layer.scales, self.group_size)

    @torch.no_grad()
    def quantize(self, layer: nn.Linear, weight: torch.Tensor) -> None:
        for leaf, t in zip(("qweight", "qzeros", "scales"), quantize_rtn(weight, self.group_size),
                           strict=True):
            getattr(layer, leaf).copy_(t)


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """int (R, C), each 0..15 → AWQ-packed int32 (R, C / 8): nibble i of word p holds column
    ``8p + AWQ_ORDER[i]``."""
    rows, cols = values.shape
    if cols % PACK:
        raise ValueError(f"{cols} columns do not pack into words of {PACK}")
    nibbles = values.to(torch.int64).view(rows, cols // PACK, PACK)[..., list(AWQ_ORDER)]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=values.device)
    words = (nibbles << shifts).sum(-1)  # (R, C / 8), 0 .. 2^32 - 1
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # as int32 bits


def quantize_rtn(weight: torch.Tensor, group_size: int = 128
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A weight (N, K) → (qweight, qzeros, scales) in AutoAWQ's layout: per output column and
    group of ``group_size`` inputs, ``scale = (max - min) / 15`` (rounded to float16, as stored),
    ``zero = round(-min / scale)`` and ``q = clamp(round(w / scale) + zero, 0, 15)``."""
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"{k} inputs do not split into groups of {group_size}")
    w = weight.float().t().reshape(k // group_size, group_size, n)  # (groups, G, N)
    lo, hi = w.amin(dim=1), w.amax(dim=1)  # (groups, N)
    scales = ((hi - lo).clamp(min=1e-5) / 15).half()
    s = scales.float()
    zeros = (-torch.round(lo / s)).clamp(0, 15)
    q = (torch.round(w / s[:, None]) + zeros[:, None]).clamp(0, 15)  # (groups, G, N)
    qweight = pack_int4(q.reshape(k, n).to(torch.int32))
    return qweight, pack_int4(zeros.to(torch.int32)), scales
