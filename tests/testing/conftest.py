"""Shared tiny checkpoints: each (preset, format, seed, dtype) is written once per session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from vlmdeploy.testing.checkpoint import make_checkpoint


@pytest.fixture(scope='session')
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    cache: dict[tuple, Path] = {}

    def get(preset: str = 'tiny', fmt: str = 'original', seed: int = 0,
            dtype: torch.dtype = torch.float32) -> Path:
        key = (preset, fmt, seed, dtype)
        if key not in cache:
            out = tmp_path_factory.mktemp(f'{preset}-{fmt}-{seed}')
            cache[key] = make_checkpoint(out, preset, fmt, seed=seed, dtype=dtype)
        return cache[key]

    return get
