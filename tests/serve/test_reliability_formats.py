"""Structured-output formats that compile but cannot be followed (P16), against the real pipeline
on the tiny checkpoint (CPU).

llguidance compiles grammars lazily and gives up when one of its lexer or parser limits is hit,
which may be at the first mask or only after some tokens (``a{1000000}`` compiles, then fails
on its first ``a``). Such a failure is the format's, so it is a 400 (an SSE error frame of type
``invalid_request_error`` once a stream has started), never a 500 that the OpenAI SDKs would
retry, and never an answer that ends with ``finish_reason: "stop"`` as if the grammar were
complete: llguidance shares a grammar's lexer between its copies, so a later request of the same
format sees the failure at once and must be refused, not answered with empty text.
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from serve_helpers import assert_error, chat
from test_serve_real import assert_idle

from vlmdeploy.serve import ServerConfig, create_app

URL = "/v1/chat/completions"
FAILED = "response_format_failed"


@pytest.fixture
def mask_budget_off(monkeypatch):
    """Lets a grammar whose masks cost more than the budget past admission, so that it can fail
    while it runs (a{1000000}'s lexer gives up after its first token)."""
    monkeypatch.setattr("vlmdeploy.frontend.guided.MASK_BUDGET_S", float("inf"))


@pytest.fixture(scope="module")
def real(real_pipe) -> TestClient:
    return TestClient(create_app(real_pipe, ServerConfig()))


def _stream_events(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [line[6:] for line in response.text.split("\n\n") if line.startswith("data: ")]


def test_a_grammar_that_fails_while_generating_is_a_400_not_a_500(
    real, real_pipe, mask_budget_off
):
    body = chat("hi", max_tokens=8, temperature=0, guided_regex="a{1000000}")
    first = real.post(URL, json=body)  # fails after its first token, in the engine
    assert_error(first, 400, FAILED, "response_format")
    again = real.post(URL, json=body)  # the shared lexer has failed: refused before any work
    assert_error(again, 400, FAILED, "response_format")
    assert_idle(real_pipe)
    assert real.get("/health").status_code == 200
    assert real.post(URL, json=chat("hi", max_tokens=2)).status_code == 200


def test_a_grammar_that_fails_mid_stream_ends_with_an_invalid_request_frame(
    real, real_pipe, mask_budget_off
):
    body = chat("hi", max_tokens=8, temperature=0, n=2, stream=True, guided_regex="b{1000000}")
    events = _stream_events(real.post(URL, json=body))
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        FAILED,
        "response_format",
    )
    assert "<state>" not in error["message"]  # llguidance's state dump stays out
    assert_idle(real_pipe)


@pytest.mark.parametrize(
    "schema",
    [
        {"$ref": "#"},  # matches no finite text
        {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
    ],
)
def test_a_format_no_text_can_satisfy_is_refused_not_answered_empty(real, real_pipe, schema):
    fmt = {"type": "json_schema", "json_schema": {"name": "loop", "schema": schema}}
    for stream in (False, True):
        response = real.post(URL, json=chat("hi", max_tokens=8, response_format=fmt, stream=stream))
        assert_error(response, 400, FAILED, "response_format")
    assert_idle(real_pipe)


def test_completions_name_their_prompt_field_in_errors(real):
    response = real.post("/v1/completions", json={"prompt": "x<IMG_CONTEXT>", "max_tokens": 2})
    assert_error(response, 400, "invalid_prompt", "prompt")
    response = real.post(URL, json=chat("x<IMG_CONTEXT>", max_tokens=2))
    assert_error(response, 400, "invalid_prompt", "messages")
