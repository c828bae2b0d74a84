"""The server's pipeline contract (`vlmdeploy.serve.contract.ServedPipeline`) is met in full by the
real pipeline and by the test double the server tests use, with the protocol's parameter names and
defaults, so the server never needs to ask what a pipeline can do."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from fake_pipeline import FakePipeline

from vlmdeploy.frontend.pipeline import Pipeline
from vlmdeploy.serve.contract import ServedPipeline

METHODS = ["prepare", "reconfigure", "generate_prepared", "abort", "stats", "new_session_id"]


def test_the_protocol_lists_what_the_server_uses():
    members = {n for n in dir(ServedPipeline) if not n.startswith("_")}
    assert set(METHODS) <= members
    assert set(ServedPipeline.__annotations__) == {"model_name", "session_len", "tokenizer"}


def check_signatures(impl: type) -> None:
    for name in METHODS:
        want = inspect.signature(getattr(ServedPipeline, name))
        have = inspect.signature(getattr(impl, name))
        assert list(have.parameters) == list(want.parameters), (impl, name)
        for p, q in zip(want.parameters.values(), have.parameters.values(), strict=True):
            assert q.kind == p.kind, (impl, name, p.name)
            if p.default is not inspect.Parameter.empty:
                assert q.default == p.default, (impl, name, p.name)
        coroutine = inspect.iscoroutinefunction(getattr(ServedPipeline, name))
        assert inspect.iscoroutinefunction(getattr(impl, name)) == coroutine, (impl, name)


@pytest.mark.parametrize("impl", [Pipeline, FakePipeline])
def test_methods_match_the_protocol(impl):
    check_signatures(impl)


def check_instance(pipe: Any) -> None:
    assert isinstance(pipe, ServedPipeline)
    assert isinstance(pipe.model_name, str) and isinstance(pipe.session_len, int)
    text = pipe.tokenizer.decode([0], skip_special_tokens=False)
    assert isinstance(text, str)
    a, b = pipe.new_session_id(), pipe.new_session_id()
    assert a != b


def test_the_fake_is_a_served_pipeline():
    check_instance(FakePipeline())


def test_the_real_pipeline_is_a_served_pipeline(real_pipe):
    check_instance(real_pipe)
    assert isinstance(real_pipe.stats()["num_running"], int)
