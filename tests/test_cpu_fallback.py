"""Without a GPU, the default device (LMDeploy's "cuda") falls back to the CPU and says so at INFO,
so the main job's stderr stays empty."""

from __future__ import annotations

import logging

import pytest
import torch

from vlmdeploy.engine.config import _device


def test_the_cpu_fallback_is_said_at_info(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    caplog.set_level(logging.INFO, logger="vlmdeploy")
    assert _device("cuda") == torch.device("cpu")
    (record,) = [r for r in caplog.records if "no CUDA device" in r.getMessage()]
    assert record.levelno == logging.INFO


@pytest.mark.parametrize("kind", ["cpu"])
def test_cpu_asked_is_cpu_silently(kind, caplog):
    caplog.set_level(logging.INFO, logger="vlmdeploy")
    assert _device(kind) == torch.device("cpu") and not caplog.records
