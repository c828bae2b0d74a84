"""InternVL3.5: InternViT → pixel shuffle (v2) → ``mlp1`` projector → Qwen3, glued by token
embedding.

Image features replace the embeddings of the ``<IMG_CONTEXT>`` tokens, in order; everything else is
the plain language model. The parameter tree mirrors the original checkpoint layout
(``vision_model``, ``mlp1``, ``language_model``), with q/k/v and gate/up fused; the loader maps
every layout onto it. :func:`vlmdeploy.models.build.build_model` builds it with the fast paths of
:mod:`vlmdeploy.models.fast_paths` applied.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmdeploy.config import ModelConfig
from vlmdeploy.models.gpt_oss import GptOssForCausalLM
from vlmdeploy.models.internvit import InternViT
from vlmdeploy.models.qwen3 import Qwen3ForCausalLM
from vlmdeploy.models.qwen3_moe import Qwen3MoeForCausalLM


def pixel_shuffle(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """(N, 32, 32, C) → (N, 16, 16, 4C). Output (i, j) concatenates the C-vectors of patches (2i,
    2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1) in that order — not ``F.pixel_unshuffle``'s channel
    order."""
    n, h, w, c = x.shape
    f = int(1 / ratio)
    x = x.view(n, h // f, f, w // f, f, c)  # (N, i, di, j, dj, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(n, h // f, w // f, f * f * c)


class Projector(nn.Sequential):
    """``mlp1``: LayerNorm(4C) → Linear(4C, H) → GELU → Linear(H, H); indices match the checkpoint
    (0, 1, 3)."""

    def __init__(self, cfg: ModelConfig):
        h = cfg.text.hidden_size
        super().__init__(
            nn.LayerNorm(cfg.projector_in, eps=cfg.projector_norm_eps),
            nn.Linear(cfg.projector_in, h),
            nn.GELU(),
            nn.Linear(h, h),
        )


class InternVLForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_model = InternViT(cfg.vision, cfg.select_layer)
        self.mlp1 = Projector(cfg)
        if cfg.text.is_gpt_oss:
            self.language_model = GptOssForCausalLM(cfg.text)
        else:
            self.language_model = (
                Qwen3MoeForCausalLM(cfg.text) if cfg.text.is_moe else Qwen3ForCausalLM(cfg.text)
            )

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N tiles, 3, 448, 448) → (N, 256, H) language-model embeddings."""
        x = self.vision_model(pixel_values)[:, 1:]  # drop CLS: (N, 1024, C)
        side = int(x.shape[1] ** 0.5)
        x = pixel_shuffle(x.reshape(x.shape[0], side, side, -1), self.cfg.downsample_ratio)
        return self.mlp1(x.flatten(1, 2))  # (N, 256, H)

    def embed(
        self,
        input_ids: torch.Tensor,
        image_embeds: torch.Tensor | None,
        image_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Token embeddings (T, H) with the rows of ``image_mask`` replaced by ``image_embeds`` in
        order."""
        x = self.language_model.model.embed_tokens(input_ids)
        if image_embeds is not None and image_embeds.numel():
            x = x.masked_scatter(image_mask[:, None], image_embeds.to(x.dtype))
        return x

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.language_model.model(inputs_embeds, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden)
