"""Fixtures for tests and benchmarks: random-weight InternVL3.5 checkpoints of every dense size
(`make_checkpoint`, `get_preset`) and the synthetic tokenizer they ship with."""

from __future__ import annotations

from typing import Any

from vlmdeploy.testing.presets import PRESETS, Preset, TextShape, VisionShape, get_preset

__all__ = ['PRESETS', 'Preset', 'TextShape', 'VisionShape', 'get_preset', 'make_checkpoint']


def __getattr__(name: str) -> Any:
    # Imported lazily so `python -m vlmdeploy.testing.checkpoint` does not import itself twice.
    if name == 'make_checkpoint':
        from vlmdeploy.testing.checkpoint import make_checkpoint

        return make_checkpoint
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
