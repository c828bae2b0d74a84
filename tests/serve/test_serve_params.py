"""RELIABILITY §3.2 (schema and sampling parameters), rows P1–P18, and the mapping of OpenAI
parameters to `GenerationConfig`, against the app around the FakePipeline.

P6/P7 (context length after image-token expansion) and P20 (huge text) need the real tokenizer and
tiling, so they live in test_serve_real.py.
"""

from __future__ import annotations

import json
import logging

import pytest
from serve_helpers import assert_error, chat

URL = "/v1/chat/completions"


def test_p1_unknown_model_is_404(client, fake):
    assert_error(client.post(URL, json=chat(model="gpt-4o")), 404, "model_not_found", "model")
    assert_error(client.post("/v1/completions", json={"prompt": "x", "model": "nope"}), 404,
                 "model_not_found", "model")
    assert_error(client.get("/v1/models/nope"), 404, "model_not_found", "model")
    assert client.post(URL, json=chat(model="fake-model")).status_code == 200
    assert client.get("/v1/models/fake-model").json()["id"] == "fake-model"
    assert len(fake.prepared) == 1


def test_p2_empty_messages(client):
    assert_error(client.post(URL, json={"messages": []}), 400, "empty_array", "messages")
    assert_error(client.post(URL, json={}), 400, None, "messages")
    assert_error(client.post(URL, json={"messages": "hi"}), 400, None, "messages")


@pytest.mark.parametrize("messages,param", [
    ([{"content": "hi"}], "messages[0].role"),
    ([{"role": "hacker", "content": "hi"}], "messages[0].role"),
    ([{"role": "user", "content": None}], "messages[0].content"),
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "user", "content": 5}], "messages[0].content"),
    ([{"role": "user", "content": []}], "messages[0].content"),
    (["hi"], "messages[0]"),
    ([{"role": "user", "content": "ok"}, {"role": "function", "content": "x"}],
     "messages[1].role"),
    ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "http://x/y.png"}]}],
     "messages[0].content[0].image_url"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ""}}]}],
     "messages[0].content[0].image_url.url"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:,", "detail": "ultra"}}]}], "messages[0].content[0].image_url.detail"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:,", "max_dynamic_patch": 0}}]}],
     "messages[0].content[0].image_url.max_dynamic_patch"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:,", "max_dynamic_patch": "12"}}]}],
     "messages[0].content[0].image_url.max_dynamic_patch"),
])
def test_p3_bad_messages_name_the_exact_param(client, fake, messages, param):
    assert_error(client.post(URL, json={"messages": messages}), 400, None, param)
    assert fake.prepared == []


@pytest.mark.parametrize("part", [{"type": "video"}, {"type": "input_audio"}, {"type": "file"},
                                  {"type": "image"}])
def test_p4_unsupported_content_type(client, part):
    body = chat([{"type": "text", "text": "hi"}, part])
    assert_error(client.post(URL, json=body), 400, "unsupported_content_type",
                 "messages[0].content[1].type")


def test_p4_images_only_in_user_messages(client):
    body = {"messages": [{"role": "system", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}, {"role": "user", "content": "x"}]}
    assert_error(client.post(URL, json=body), 400, "unsupported_content_type",
                 "messages[0].content[0]")


@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("value", [0, -1, "10", 10.5, 1e9, True, []])
def test_p5_bad_max_tokens(client, name, value):
    assert_error(client.post(URL, json=chat(**{name: value})), 400, None, name)


def test_p5_max_tokens_limits_the_answer(client, fake):
    body = client.post(URL, json=chat(max_tokens=2, ignore_eos=True)).json()
    assert body["choices"][0]["message"]["content"] == "Hello,"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2
    client.post(URL, json=chat(max_tokens=9, max_completion_tokens=3))
    assert fake.prepared[-1].gen_config.max_new_tokens == 3  # the newer name wins
    client.post(URL, json=chat())
    assert fake.prepared[-1].gen_config.max_new_tokens is None  # up to the context limit


@pytest.mark.parametrize("n", [10**9, 0, -1, 17, 2.0, "2"])
def test_p8_n_is_bounded(client, fake, n):
    assert_error(client.post(URL, json=chat(n=n)), 400, None, "n")
    assert fake.prepared == []


def test_p8_completions_bound_prompts_times_n(client):
    body = {"prompt": ["a"] * 5, "n": 16}
    assert_error(client.post("/v1/completions", json=body), 400, None, "n")
    assert_error(client.post("/v1/completions", json={"prompt": ["a"] * 65}), 400, None, "prompt")


@pytest.mark.parametrize("value", [-1, 3, 2.0001, "1", {}])
def test_p9_temperature_out_of_range(client, value):
    assert_error(client.post(URL, json=chat(temperature=value)), 400, None, "temperature")


@pytest.mark.parametrize("field,value", [("top_p", 0), ("top_p", 1.5), ("top_p", -0.1),
                                         ("top_k", -2), ("top_k", 1.5), ("min_p", 1.5),
                                         ("repetition_penalty", 0), ("presence_penalty", 3),
                                         ("frequency_penalty", -2.5), ("min_tokens", -1)])
def test_p10_sampling_ranges(client, field, value):
    assert_error(client.post(URL, json=chat(**{field: value})), 400, None, field)


def test_p11_logprobs_bounds(client):
    assert_error(client.post(URL, json=chat(logprobs=True, top_logprobs=10**6)), 400, None,
                 "top_logprobs")
    assert_error(client.post(URL, json=chat(logprobs=True, top_logprobs=21)), 400, None,
                 "top_logprobs")
    assert_error(client.post(URL, json=chat(top_logprobs=2)), 400, None, "top_logprobs")
    assert_error(client.post(URL, json=chat(prompt_logprobs=-1)), 400, None, "prompt_logprobs")
    assert_error(client.post(URL, json=chat(prompt_logprobs=1)), 400, "unsupported_parameter",
                 "prompt_logprobs")
    assert_error(client.post("/v1/completions", json={"prompt": "x", "logprobs": 21}), 400, None,
                 "logprobs")


@pytest.mark.parametrize("stop", [["x"] * 10_000, "y" * 1_000_000, [""], [1], {"a": 1}, ["ok", 2]],
                         ids=["10k-strings", "1MB-string", "empty", "int", "object", "mixed"])
def test_p12_stop_is_bounded(client, stop):
    assert_error(client.post(URL, json=chat(stop=stop)), 400, None, "stop")


@pytest.mark.parametrize("bias", [{"abc": 1}, {"1": 1e9}, {str(i): 1 for i in range(100_000)},
                                  {"1": "x"}, [1, 2], {"-1": 1}],
                         ids=["non-int-key", "huge-value", "100k-entries", "str-value", "list",
                              "negative-id"])
def test_p13_logit_bias_is_validated(client, bias):
    assert_error(client.post(URL, json=chat(logit_bias=bias)), 400, None, "logit_bias")


def test_p13_valid_logit_bias_is_refused_not_ignored(client):
    assert_error(client.post(URL, json=chat(logit_bias={"12": 5})), 400, "unsupported_parameter",
                 "logit_bias")
    assert client.post(URL, json=chat(logit_bias={})).status_code == 200


@pytest.mark.parametrize("seed", [2**64, 2**63, -1, "1", 1.5])
def test_p14_bad_seed(client, seed):
    assert_error(client.post(URL, json=chat(seed=seed)), 400, None, "seed")


def test_p15_tools_are_refused(client):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "pattern": "("}}}}}]
    assert_error(client.post(URL, json=chat(tools=tools)), 400, "unsupported_parameter", "tools")
    assert_error(client.post(URL, json=chat(tools="x")), 400, None, "tools")
    assert client.post(URL, json=chat(tool_choice="none")).status_code == 200


def _guided_json(schema):
    return {"type": "json_schema", "json_schema": {"name": "guided_json", "schema": schema}}


@pytest.mark.parametrize("body, want", [
    ({"response_format": {"type": "json_object"}}, {"type": "json_object"}),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {}}}},
     {"type": "json_schema", "json_schema": {"name": "a", "schema": {}}}),
    ({"guided_json": {"type": "object"}}, _guided_json({"type": "object"})),
    ({"guided_json": '{"type": "integer"}'}, _guided_json({"type": "integer"})),
    ({"guided_regex": "[0-9]+"}, {"type": "regex_schema", "regex_schema": "[0-9]+"}),
    ({"guided_choice": ["yes", "no"]}, {"type": "choice", "choice": ["yes", "no"]}),
    ({"guided_choice": ["yes"], "guided_decoding_backend": "xgrammar"},
     {"type": "choice", "choice": ["yes"]}),
])
def test_p16_structured_output_reaches_the_generation_config(client, fake, body, want):
    assert client.post(URL, json=chat(**body)).status_code == 200
    assert fake.prepared[-1].gen_config.response_format == want


@pytest.mark.parametrize("body, param, code", [
    ({"response_format": {"type": "regex", "regex": "(a|a)*"}}, "response_format", None),
    ({"guided_grammar": "root ::= 'a'"}, "guided_grammar", "unsupported_parameter"),
    ({"structured_outputs": {"json": {}}}, "structured_outputs", "unsupported_parameter"),
    ({"guided_json": "{not json"}, "guided_json", None),
    ({"guided_regex": "a", "guided_choice": ["a"]}, None, None),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex", None),
])
def test_p16_structured_output_that_cannot_be_honoured_is_a_400(client, fake, body, param, code):
    error = assert_error(client.post(URL, json=chat(**body)), 400, code)
    if param is not None:
        assert error["param"] == param
    assert fake.prepared == []


@pytest.mark.parametrize("text", [
    '{"a":' * 5000 + "1" + "}" * 5000,  # deeper than Python's parser goes: was a 500
    '{"type": "number", "maximum": NaN}',  # not JSON, as in a request body
    '{"type": "number", "maximum": Infinity}',
    "[1]",
], ids=["deep", "nan", "infinity", "not-an-object"])
def test_p16_guided_json_text_is_parsed_strictly(client, fake, text):
    assert_error(client.post(URL, json=chat(guided_json=text)), 400, None, "guided_json")
    assert fake.prepared == []
    assert client.get("/health").status_code == 200


def test_p16_text_response_format_is_fine(client):
    assert client.post(URL, json=chat(response_format={"type": "text"})).status_code == 200


def test_p17_chat_template_and_kwargs_allowlist(client, fake):
    assert_error(client.post(URL, json=chat(chat_template="{{ 7*7 }}")), 400,
                 "unsupported_parameter", "chat_template")
    for kwargs in ({"tokenize": True}, {"enable_thinking": True, "add_generation_prompt": False},
                   {"enable_thinking": "yes"}):
        response = client.post(URL, json=chat(chat_template_kwargs=kwargs))
        error = assert_error(response, 400)
        assert error["param"].startswith("chat_template_kwargs.")
    assert fake.prepared == []
    assert client.post(URL, json=chat(chat_template_kwargs={"enable_thinking": True})).status_code \
        == 200
    assert fake.prepared[-1].chat_template_kwargs == {"enable_thinking": True}


def test_p18_unknown_fields_are_ignored_logged_and_never_forwarded(client, fake, caplog):
    caplog.set_level(logging.INFO, logger="vlmdeploy.serve")
    body = chat(secret_knob="do-not-forward-me", other_knob={"x": 1})
    assert client.post(URL, json=body).status_code == 200
    text = caplog.text
    assert "secret_knob" in text and "other_knob" in text
    assert "do-not-forward-me" not in text
    prepared = fake.prepared[-1]
    assert prepared.extra == {"do_preprocess": True} and prepared.chat_template_kwargs is None
    assert "do-not-forward-me" not in json.dumps(prepared.prompt)


# ---- OpenAI parameters -> GenerationConfig ------------------------------------------------------


def test_temperature_zero_is_greedy_otherwise_sampling(client, fake):
    """Every request samples as LMDeploy's server makes it (do_sample); temperature 0 is the
    greedy one, and keeps its penalties (the engine side: test_pipeline_api)."""
    client.post(URL, json=chat(temperature=0, repetition_penalty=1.3, presence_penalty=0.5))
    cfg = fake.prepared[-1].gen_config
    assert (cfg.do_sample, cfg.temperature, cfg.repetition_penalty, cfg.presence_penalty) == (
        True, 0.0, 1.3, 0.5)
    client.post(URL, json=chat(temperature=0.7, top_p=0.9, top_k=20, min_p=0.05))
    cfg = fake.prepared[-1].gen_config
    assert (cfg.do_sample, cfg.temperature, cfg.top_p, cfg.top_k, cfg.min_p) == (
        True, 0.7, 0.9, 20, 0.05)
    client.post(URL, json=chat())  # OpenAI's defaults: temperature 1, top_k off
    cfg = fake.prepared[-1].gen_config
    assert (cfg.do_sample, cfg.temperature, cfg.top_p, cfg.top_k) == (True, 1.0, 1.0, 0)
    client.post(URL, json=chat(top_k=-1))
    assert fake.prepared[-1].gen_config.top_k == 0


def test_extras_map_to_generation_config(client, fake):
    client.post(URL, json=chat(repetition_penalty=1.3, ignore_eos=True, min_tokens=2,
                               skip_special_tokens=False, presence_penalty=0.5,
                               frequency_penalty=-0.25, seed=7, max_tokens=4,
                               logprobs=True, top_logprobs=3))
    cfg = fake.prepared[-1].gen_config
    assert cfg.repetition_penalty == 1.3 and cfg.ignore_eos is True
    assert cfg.min_new_tokens == 2 and cfg.skip_special_tokens is False
    assert cfg.presence_penalty == 0.5 and cfg.frequency_penalty == -0.25
    assert cfg.random_seed == 7 and cfg.max_new_tokens == 4 and cfg.logprobs == 3
    assert cfg.n == 1 and cfg.stop_words is None  # stop strings are matched by the server
    client.post(URL, json=chat(logprobs=True))
    assert fake.prepared[-1].gen_config.logprobs == 0


def test_min_tokens_above_max_tokens_is_400(client):
    assert_error(client.post(URL, json=chat(min_tokens=5, max_tokens=2)), 400, None, "min_tokens")


def test_seeded_choices_get_distinct_seeds(client, fake):
    client.post(URL, json=chat(n=3, seed=11))
    assert [p.gen_config.random_seed for p in fake.prepared] == [11, 12, 13]
    fake.prepared.clear()
    client.post(URL, json=chat(n=3))  # unseeded choices share one prepared request
    assert len(fake.prepared) == 1 and len(fake.started) >= 3


def test_stream_options_require_stream(client):
    assert_error(client.post(URL, json=chat(stream_options={"include_usage": True})), 400)
