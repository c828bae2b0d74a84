"""Rotary tables for RoPE with YaRN's extension (GPT-OSS), in the NeoX (rotate-half) layout that
:func:`vlmdeploy.kernels.reference.apply_rope` takes.

YaRN (Peng et al., 2023, "YaRN: Efficient Context Window Extension"): the rotary frequencies that
turn fewer than ``beta_slow`` times over the original context are interpolated (divided by
``factor``), those that turn more than ``beta_fast`` times keep their value, and a linear ramp over
the dimensions between blends the two. cos and sin are then scaled by the attention factor (by
default ``0.1 ln(factor) + 1``), which sharpens the softmax as the paper's temperature does.
Qwen3's plain RoPE stays :func:`vlmdeploy.kernels.rope_cos_sin`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vlmdeploy.config import YarnScaling


def yarn_inv_freq(head_dim: int, theta: float, yarn: YarnScaling,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, float]:
    """(inverse frequencies (head_dim / 2,) fp32, the cos/sin scale) of YaRN."""
    # base ** (2i / d) in fp32, as the frequencies of the checkpoint's training code
    pos_freqs = theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    extrapolated, interpolated = 1.0 / pos_freqs, 1.0 / (yarn.factor * pos_freqs)

    def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times
        turns = yarn.original_max_position_embeddings / (rotations * 2 * math.pi)
        return head_dim * math.log(turns) / (2 * math.log(theta))

    low, high = dim_of(yarn.beta_fast), dim_of(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # a ramp of zero width would divide by zero
    dims = torch.arange(head_dim // 2, dtype=torch.float32, device=device)
    ramp = ((dims - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: the original frequency, 0: the interpolated one
    inv_freq = interpolated * (1 - keep) + extrapolated * keep
    scale = yarn.attention_factor
    if scale is None:
        scale = 0.1 * math.log(yarn.factor) + 1.0 if yarn.factor > 1 else 1.0
    return inv_freq, float(scale)


class YarnRotary(nn.Module):
    """cos/sin tables (T, head_dim) of positions under YaRN.

    The frequencies are made on the positions' device at each call (a few tiny ops per step,
    shared by all layers): the model is built on the meta device and materialised empty, which a
    buffer would not survive, and a host-to-device copy could not be captured in a CUDA graph.
    """

    def __init__(self, head_dim: int, theta: float, yarn: YarnScaling):
        super().__init__()
        self.head_dim, self.theta, self.yarn = head_dim, theta, yarn

    def forward(self, positions: torch.Tensor, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq, scale = yarn_inv_freq(self.head_dim, self.theta, self.yarn, positions.device)
        freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, D / 2) fp32
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)
