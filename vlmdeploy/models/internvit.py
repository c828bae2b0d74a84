"""InternViT vision encoder (InternViT-300M and InternViT-6B), on fixed 448×448 tiles.

Each tile is 32×32 patches of 14 px plus a CLS token (1025 tokens); attention is bidirectional with
no mask, so it goes straight to SDPA (the flash path on GPU). A layer is
``h = x + attn(norm1(x)) · ls1``; ``out = h + mlp(norm2(h)) · ls2``, with per-channel layer scales
``ls1``/``ls2``. InternViT-6B differs only in RMSNorm, q/k RMSNorm over the whole width and no qkv
bias, all taken from the config.

This file is the model as published. The engine runs it through
:func:`vlmdeploy.models.fast_paths.apply_fast_paths`, which swaps the encoder's layer loop for one
that fuses each residual update with the norm after it; both compute the same function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmdeploy.config import VisionConfig
from vlmdeploy.layers.norm import make_norm

_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def activation(name: str):
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r} (supported: {', '.join(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        c = cfg.hidden_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, c))
        self.patch_embedding = nn.Conv2d(3, c, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, c))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: (N, 3, 448, 448) → (N, 1025, C).

        The stride-14 14×14 convolution is a matrix product over non-overlapping patches (the
        paper's linear patch projection), so it runs as one GEMM: cuDNN's convolution would plan
        an algorithm for every new tile count at its first use, mid-batch, and its kernels for
        this shape are far slower than the GEMM's."""
        w, b = self.patch_embedding.weight, self.patch_embedding.bias  # (C, 3, p, p), (C,)
        n, p = pixel_values.shape[0], w.shape[-1]
        g = pixel_values.shape[-1] // p
        patches = (
            pixel_values.to(w.dtype)
            .view(n, 3, g, p, g, p)
            .permute(0, 2, 4, 1, 3, 5)  # (N, row, col, 3, p, p): one patch per row
            .reshape(n, g * g, 3 * p * p)
        )
        x = F.linear(patches, w.view(w.shape[0], -1), b)  # (N, 1024, C)
        cls = self.class_embedding.expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.fused = {"qkv": [cfg.hidden_size] * 3}  # loader's row split for split q/k/v
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = make_norm("rms_norm", cfg.hidden_size, cfg.norm_eps)
            self.k_norm = make_norm("rms_norm", cfg.hidden_size, cfg.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # each (N, T, C)
        if self.qk_norm:  # InternViT-6B normalises the whole C-wide vector, not per head
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (y.view(n, t, self.num_heads, self.head_dim).transpose(1, 2) for y in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v)  # (N, heads, T, D)
        return self.proj(o.transpose(1, 2).reshape(n, t, c))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.act = activation(cfg.hidden_act)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = make_norm(cfg.norm_type, cfg.hidden_size, cfg.norm_eps)
        self.attn = VisionAttention(cfg)
        self.ls1 = nn.Parameter(torch.ones(cfg.hidden_size))
        self.norm2 = make_norm(cfg.norm_type, cfg.hidden_size, cfg.norm_eps)
        self.mlp = VisionMLP(cfg)
        self.ls2 = nn.Parameter(torch.ones(cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attn(self.norm1(x)) * self.ls1
        return h + self.mlp(self.norm2(h)) * self.ls2


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_layers))

    def forward(self, x: torch.Tensor, num_layers: int) -> torch.Tensor:
        """The residual stream (N, T, C) through the first ``num_layers`` layers."""
        for layer in self.layers[:num_layers]:
            x = layer(x)
        return x


class InternViT(nn.Module):
    def __init__(self, cfg: VisionConfig, select_layer: int = -1):
        super().__init__()
        # Only layers up to the selected one run (select_layer -1 = all of them).
        self.num_run = cfg.num_layers + 1 + select_layer if select_layer < 0 else select_layer
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoder(cfg)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, 448, 448) → (N, 1025, C): the selected layer's output, CLS included."""
        return self.encoder(self.embeddings(pixel_values), self.num_run)
