"""Tiny checkpoints whose language-model projections split into whole 128-blocks at tp = 1 and 2
(head_dim 128), in bf16 and as the quantising tool writes them: blocked FP8 and AutoAWQ."""

from __future__ import annotations

from pathlib import Path

import torch

from vlmdeploy.testing.checkpoint import make_checkpoint
from vlmdeploy.testing.quantize import quantize_checkpoint

ALIGNED = {"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 128, "intermediate_size": 512, "vocab_size": 2048}


def write_quant_checkpoints(root: Path) -> dict[str, str]:
    """``{"bf16": ..., "fp8": ..., "awq": ...}``: one seeded model, three checkpoints."""
    bf16 = make_checkpoint(root / "bf16", "tiny", "hf", seed=0, dtype=torch.bfloat16,
                           text_overrides=ALIGNED)
    return {"bf16": str(bf16),
            "fp8": str(quantize_checkpoint(bf16, root / "fp8", "fp8")),
            "awq": str(quantize_checkpoint(bf16, root / "awq", "awq"))}
