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


class _Allow:
    """A guide that allows exactly the given tokens."""

    def __init__(self, tokens):
        self.tokens = tokens

    def fill(self, bitmask, row):
        for t in self.tokens:
            word = int(bitmask[row, t // 32])
            bit = (1 << (t % 32)) if t % 32 < 31 else -(1 << 31)
            bitmask[row, t // 32] = word | bit


@pytest.mark.parametrize("allowed", [[31], [63, 5], [0], [94]])
def test_the_sampler_picks_only_allowed_tokens(allowed):
    logits = torch.randn(3, 95)
    logits[:, allowed] -= 100.0  # the allowed ones are the least likely
    params = [SamplingParams(), SamplingParams(guide=_Allow(allowed)),
              SamplingParams(greedy=False, seed=None, guide=_Allow(allowed))]
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
