"""Checkpoints the GPU tests share, written once per session (the tests only read them)."""

from __future__ import annotations

import pytest
import torch

from vlmdeploy.testing.checkpoint import make_checkpoint


@pytest.fixture(scope="session")
def ckpt_1b(tmp_path_factory):
    """``ckpt_1b(fmt)``: the 1B shape with seed-0 random bf16 weights in layout ``fmt``
    ('original' or 'hf'), about 2 GB, written on first use and reused after."""
    made: dict[str, str] = {}

    def get(fmt: str) -> str:
        if fmt not in made:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            out = tmp_path_factory.mktemp(f"1b-{fmt}")
            made[fmt] = str(
                make_checkpoint(out, "1b", fmt, seed=0, dtype=torch.bfloat16, device=device)
            )
        return made[fmt]

    return get
