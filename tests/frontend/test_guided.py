"""Structured output on the embedded model: every answer parses and validates against its schema,
regular expressions and choices hold, bad formats are refused before any work, and unconstrained
requests in the same batch give the tokens they give alone."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from vlmdeploy import GenerationConfig, pipeline
from vlmdeploy.engine.sampling import SamplingParams, sample
from vlmdeploy.errors import InvalidRequestError
from vlmdeploy.frontend.guided import grammar_of
from vlmdeploy.testing.guides import AllowOnly

SCHEMA = {
    "type": "object",
    "properties": {
        "shape": {"type": "string", "enum": ["circle", "square", "triangle", "star"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
        "colours": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "note": {"type": "string", "maxLength": 12},
    },
    "required": ["shape", "count", "colours"],
    "additionalProperties": False,
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "scene", "schema": SCHEMA}}
PROMPTS = ["Describe the image as JSON.", "What shapes are there?", "hello", "Count the stars."]


@pytest.fixture(scope="module")
def pipe():
    with pipeline(log_level="WARNING") as p:
        yield p


@pytest.fixture
def mask_budget_off(monkeypatch):
    """Lets a grammar whose masks cost more than the budget past admission, so that it can fail
    while it runs (a{1000000}'s lexer gives up after its first token)."""
    monkeypatch.setattr("vlmdeploy.frontend.guided.MASK_BUDGET_S", float("inf"))


def test_json_schema_answers_always_parse_and_validate(pipe):
    gens = [GenerationConfig(max_new_tokens=96, response_format=JSON_SCHEMA)]
    gens += [GenerationConfig(max_new_tokens=96, response_format=JSON_SCHEMA, do_sample=True,
                              temperature=1.5, top_k=0, random_seed=seed) for seed in range(3)]
    for gen in gens:
        for out in pipe(PROMPTS, gen_config=gen):
            assert out.finish_reason == "stop", out.text
            jsonschema.validate(json.loads(out.text), SCHEMA)


def test_json_object_regex_and_choice(pipe):
    # Any object: keys and strings are unbounded, so an answer may run to its length limit;
    # one that ends on its own is a JSON object.
    ended = 0
    for seed in range(4):
        out = pipe("Anything as JSON", gen_config=GenerationConfig(
            max_new_tokens=64, response_format={"type": "json_object"}, do_sample=True,
            random_seed=seed))
        assert out.text.startswith("{")
        if out.finish_reason == "stop":
            assert isinstance(json.loads(out.text), dict)
            ended += 1
    assert ended
    pattern = r"[0-9]{3}-[a-z]{2}"
    for seed in range(4):
        gen = GenerationConfig(max_new_tokens=16, do_sample=True, temperature=2.0, top_k=0,
                               random_seed=seed,
                               response_format={"type": "regex_schema", "regex_schema": pattern})
        assert re.fullmatch(pattern, pipe("code?", gen_config=gen).text)
        gen = GenerationConfig(max_new_tokens=16, do_sample=True, temperature=2.0, top_k=0,
                               random_seed=seed,
                               response_format={"type": "choice", "choice": ["red", "green"]})
        assert pipe("colour?", gen_config=gen).text in ("red", "green")


def test_unconstrained_requests_beside_constrained_ones_are_unchanged(pipe):
    plain = GenerationConfig(max_new_tokens=24, ignore_eos=True)
    alone = [o.token_ids for o in pipe(PROMPTS, gen_config=plain)]
    guided = GenerationConfig(max_new_tokens=24, response_format=JSON_SCHEMA)
    mixed = pipe([*PROMPTS, *PROMPTS], gen_config=[plain] * 4 + [guided] * 4)
    assert [o.token_ids for o in mixed[:4]] == alone
    for out in mixed[4:]:
        assert out.text.startswith("{")


@pytest.mark.parametrize("fmt", [
    {"type": "xml"},
    {"type": "json_schema"},
    {"type": "json_schema", "json_schema": {"pattern": "(a+)+$"}},  # no name, no schema
    {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}},  # no name
    {"type": "json_schema", "json_schema": {"name": "a", "schema": "not a schema"}},
    {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "nonsense"}}},
    {"type": "regex_schema", "regex_schema": "(unclosed"},
    {"type": "regex_schema", "regex_schema": 5},
    {"type": "choice", "choice": []},
    "json",
])
def test_bad_formats_are_refused(pipe, fmt):
    with pytest.raises(InvalidRequestError):
        pipe("hi", gen_config=GenerationConfig(max_new_tokens=4, response_format=fmt))


def test_text_format_is_unconstrained():
    assert grammar_of({"type": "text"}) is None and grammar_of(None) is None


@pytest.mark.parametrize("allowed", [[31], [63, 5], [0], [94]])
def test_the_sampler_picks_only_allowed_tokens(allowed):
    logits = torch.randn(3, 95)
    logits[:, allowed] -= 100.0  # the allowed ones are the least likely
    params = [SamplingParams(), SamplingParams(guide=AllowOnly(allowed)),
              SamplingParams(greedy=False, seed=None, guide=AllowOnly(allowed))]
    tokens, _ = sample(logits, params, [[], [], []], [0, 0, 0])
    assert tokens[0] == int(logits[0].argmax())
    assert tokens[1] == max(allowed, key=lambda t: float(logits[1, t]))
    assert tokens[2] in allowed


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                         "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "count_shapes", "parameters": {
        "type": "object", "properties": {"shape": {"enum": ["circle", "star"]}},
        "required": ["shape"], "additionalProperties": False}}},
]


@pytest.mark.parametrize("choice", ["required", "get_weather", "count_shapes"])
def test_a_forced_tool_call_is_always_a_valid_call_of_a_declared_tool(pipe, choice):
    """The embedded model knows nothing of tools; the grammar alone makes its answer a call."""
    from fastapi.testclient import TestClient

    from vlmdeploy.serve import ServerConfig, create_app

    client = TestClient(create_app(pipe, ServerConfig(tool_call_parser="qwen3")))
    tool_choice = choice if choice == "required" else {
        "type": "function", "function": {"name": choice}}
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for seed in range(3):
        body = {"model": pipe.model_name, "messages": [{"role": "user", "content": "Weather?"}],
                "tools": TOOLS, "tool_choice": tool_choice, "max_tokens": 96, "seed": seed,
                "temperature": 1.0}
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        message = response.json()["choices"][0]["message"]
        (call,) = message["tool_calls"]
        name = call["function"]["name"]
        assert name == choice or (choice == "required" and name in schemas)
        jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[name])


# ---- grammars that compile but cannot be followed ---------------------------------------------


def _regex(pattern: str) -> dict:
    return {"type": "regex_schema", "regex_schema": pattern}


def test_a_failed_grammar_is_never_taken_for_a_finished_one(pipe, mask_budget_off):
    """llguidance gives up on ``x{1000000}`` after its first ``x`` (a lexer limit). The guide
    then refuses every token, so the engine fails the request, and keeps the reason; before, an
    errored matcher counted as stopped and the request ended with finish_reason 'stop'."""
    guided = pipe.preparer.guided
    guide = guided.guide(_regex("x{1000000}"), frozenset({0}))
    fork = guide.for_request().fork()
    token = pipe.tokenizer.hf.encode("x", add_special_tokens=False)[0]
    bitmask = torch.zeros(1, (guided.vocab_size + 31) // 32, dtype=torch.int32)
    fork.fill(bitmask, 0)
    assert not fork.advance(token) and fork.advance(0) is False  # not even a stop token
    assert "too many expressions" in fork.failure
    assert guide.failure is None  # the record is the engine request's, not the prompt's
    fork.fill(bitmask, 0)
    assert bool((bitmask == -1).all())  # any token: advance() then fails the request


def test_a_grammar_that_fails_is_an_error_never_a_stop(pipe, mask_budget_off):
    """The first failure also breaks the compiled grammar for its later copies (llguidance
    shares their lexer): later requests compile it afresh and fail the same way, in the engine;
    before, they ended at once with empty text and finish_reason 'stop'."""
    gen = GenerationConfig(max_new_tokens=8, response_format=_regex("y{1000000}"))
    for _ in range(3):
        out = pipe("hi", gen_config=gen)  # fails in the engine, after its first token
        assert out.finish_reason == "error", out


@pytest.mark.parametrize("schema", [{"$ref": "#"},
                                    {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}])
def test_a_format_no_text_can_satisfy_is_refused_before_it_runs(pipe, schema):
    fmt = {"type": "json_schema", "json_schema": {"name": "loop", "schema": schema}}
    with pytest.raises(InvalidRequestError) as info:  # was: text "" with finish_reason 'stop'
        pipe("hi", gen_config=GenerationConfig(max_new_tokens=8, response_format=fmt))
    assert (info.value.code, info.value.param) == ("response_format_failed", "response_format")


@pytest.mark.parametrize("threads", ["1", "2"])
def test_a_batch_of_masks_equals_each_mask_alone(pipe, mask_budget_off, monkeypatch, threads):
    """A step's guided rows are filled in one call (on llguidance's pool of
    VLMDEPLOY_MASK_THREADS threads): each row, in any row order, is what its grammar alone
    allows (llguidance's own single-matcher mask), with the
    stop tokens added once the grammar accepts, only those once it has stopped, and every token
    once it has failed."""
    import numpy as np

    from vlmdeploy.frontend.guided import Guide

    monkeypatch.setenv("VLMDEPLOY_MASK_THREADS", threads)
    guided, hf = pipe.preparer.guided, pipe.tokenizer.hf
    stop = 7

    def state(fmt, text):
        guide = guided.guide(fmt, frozenset({stop})).for_request().fork()
        for token in hf.encode(text, add_special_tokens=False) if text else []:
            guide.advance(token)
        return guide

    guides = [
        state(JSON_SCHEMA, ""),
        state(JSON_SCHEMA, '{"shape":"ci'),
        state(_regex("[0-9]{1,4}"), "12"),  # accepting, not stopped
        state({"type": "choice", "choice": ["yes", "no"]}, "yes"),  # stopped
        state(_regex("q{1000000}"), "q"),  # failed (its own lexer: x{...} fails above)
        state({"type": "json_object"}, '{"a": [1, 2'),
    ]
    assert guides[2].matcher.is_accepting() and not guides[2].matcher.is_stopped()
    assert guides[3].matcher.is_stopped() and guides[4].matcher.is_error()
    words = (guided.vocab_size + 31) // 32
    expected = np.zeros((len(guides), words), dtype=np.int32)
    for i, guide in enumerate(guides):
        m = guide.matcher
        if m.is_error():
            expected[i] = -1
            continue
        if not m.is_stopped():
            expected[i] = np.frombuffer(m.compute_bitmask(), dtype=np.int32)[:words]
        if m.is_stopped() or m.is_accepting():
            expected[i, stop // 32] |= 1 << (stop % 32)
    rows = [5, 3, 0, 6, 1, 2]  # any order, one row (4) left alone
    bitmask = torch.zeros(len(guides) + 1, words, dtype=torch.int32)
    Guide.fill_rows(guides, bitmask, rows)
    for row, want in zip(rows, expected):
        assert np.array_equal(bitmask[row].numpy(), want), row
    assert not bitmask[4].any()
    assert int(expected[0].astype(np.uint32).view(np.uint8).sum()) > 0  # a real mask was compared


def test_a_format_too_costly_to_follow_is_refused_before_it_runs(pipe):
    """A literal pattern of 50,000 characters costs about 20 ms a token's mask, and every step of
    the batch would wait for it: refused with a 400-class error. Large but cheap formats pass."""
    from vlmdeploy.frontend.guided import MASK_BUDGET_S

    costly = GenerationConfig(max_new_tokens=4, response_format=_regex("e" * 50_000))
    with pytest.raises(InvalidRequestError) as info:
        pipe("hi", gen_config=costly)
    assert (info.value.code, info.value.param) == ("response_format_failed", "response_format")
    assert "too costly" in str(info.value) and f"{MASK_BUDGET_S * 1e3:g} ms" in str(info.value)
    labels = [f"label{i:05d}" for i in range(10_000)]  # 100 KB of choices, cheap to follow
    wide = {"type": "object", "properties": {f"f{i}": {"type": "string"} for i in range(300)}}
    for fmt in ({"type": "choice", "choice": labels}, _regex("e" * 500),
                {"type": "json_schema", "json_schema": {"name": "wide", "schema": wide}}):
        out = pipe("hi", gen_config=GenerationConfig(max_new_tokens=4, response_format=fmt))
        assert out.finish_reason in ("length", "stop"), fmt
