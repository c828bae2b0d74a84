"""A stand-in ``lmdeploy`` module for the LMDeploy runners' tests (LMDeploy is only on the GPU
machine): it records what a runner asks of it and answers with outputs of the asked lengths."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass

import pytest


@dataclass
class _Out:
    text: str
    input_token_len: int
    generate_token_len: int


@pytest.fixture
def fake_lmdeploy(monkeypatch):
    """Installs the stand-in; returns what it records: the engine config (``engine``), each
    batch's prompts and generation configs (``batches``), each stream's (``streams``), the model
    (``model``) and whether the pipeline was closed (``closed``)."""
    calls: dict = {"batches": [], "streams": []}

    class GenerationConfig:
        def __init__(self, **kw):
            self.__dict__.update(kw)
            self.kwargs = kw

    class PytorchEngineConfig:
        def __init__(self, **kw):
            calls["engine"] = kw

    class Pipe:
        def __call__(self, prompts, gen_config):
            calls["batches"].append((prompts, [g.kwargs for g in gen_config]))
            return [_Out("", 1000, g.max_new_tokens) for g in gen_config]

        def stream_infer(self, prompts, gen_config):
            calls["streams"].append((prompts, gen_config.kwargs))
            for i in range(gen_config.max_new_tokens):
                yield _Out(f" w{i}", 1000, i + 1)

        def close(self):
            calls["closed"] = True

    def pipeline(model, backend_config):
        calls["model"] = model
        return Pipe()

    mod = types.ModuleType("lmdeploy")
    mod.__version__ = "0.18.0"
    mod.GenerationConfig, mod.PytorchEngineConfig, mod.pipeline = (
        GenerationConfig, PytorchEngineConfig, pipeline)
    monkeypatch.setitem(sys.modules, "lmdeploy", mod)
    return calls
