"""Normalisation layers. RMSNorm computes its statistics in fp32 and returns the input dtype."""

from __future__ import annotations

import torch
from torch import nn

from vlmdeploy import kernels


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without ``residual``: ``norm(x)``. With it: ``(norm(x + residual), x + residual)``."""
        out, res = kernels.rms_norm(x, self.weight, self.eps, residual)
        return out if residual is None else (out, res)


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """The vision tower's norm: LayerNorm (InternViT-300M) or RMSNorm (InternViT-6B)."""
    if kind == "layer_norm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rms_norm":
        return RMSNorm(dim, eps)
    raise ValueError(f"unsupported norm_type {kind!r} (expected 'layer_norm' or 'rms_norm')")


def norm_params(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, float, bool]:
    """``(weight, bias, eps, rms)`` of a :func:`make_norm` layer, the arguments
    :func:`vlmdeploy.kernels.scaled_add_norm` takes after its inputs."""
    if isinstance(norm, RMSNorm):
        return norm.weight, None, norm.eps, True
    return norm.weight, norm.bias, norm.eps, False
