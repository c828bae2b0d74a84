"""Steps of a few tokens take the fused one-row path (``fast_paths.forward_row``); bigger ones
the general path. Both must give the same generations: a batch of three decoding requests runs
through the engine once with the row path for up to 16 tokens and once with it off, and the tokens
and the top log-probabilities of every step agree."""

from __future__ import annotations

import pytest

from vlmdeploy import GenerationConfig, PytorchEngineConfig, pipeline
from vlmdeploy.models import fast_paths


def generate(path: str, monkeypatch, limit: int) -> list:
    monkeypatch.setattr(fast_paths, "ROW_PATH_TOKENS", limit)
    gen = GenerationConfig(max_new_tokens=6, ignore_eos=True, logprobs=3)
    with pipeline(path, backend_config=PytorchEngineConfig(session_len=512)) as pipe:
        return pipe(["Hi", "tell me a story", "A longer text-only prompt " * 5], gen_config=gen)


def test_row_path_equals_general_path(tiny_ckpts, monkeypatch):
    calls = []
    real = fast_paths.forward_row

    def spy(layer, h, cos, sin):
        calls.append(h.shape[0])
        return real(layer, h, cos, sin)

    monkeypatch.setattr(fast_paths, "forward_row", spy)
    rows = generate(tiny_ckpts["hf"], monkeypatch, 16)
    assert 3 in calls, "no three-token step took the row path"
    calls.clear()
    general = generate(tiny_ckpts["hf"], monkeypatch, 0)
    assert not calls
    for a, b in zip(rows, general, strict=True):
        assert a.token_ids == b.token_ids
        for la, lb in zip(a.logprobs, b.logprobs, strict=True):
            assert la.keys() == lb.keys()
            assert list(la.values()) == pytest.approx(list(lb.values()), abs=1e-5)
