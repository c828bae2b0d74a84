"""Tool calls through `/v1/chat/completions` (`tools`, `tool_choice`, `--tool-call-parser`), with
the model's answer scripted by FakePipeline; the round trip goes through the official `openai`
client, streaming and not."""

from __future__ import annotations

import json

import pytest
from fake_pipeline import FakePipeline
from openai import OpenAI
from serve_helpers import assert_error, make_client, run_live

from vlmdeploy.serve import ServerConfig, create_app

URL = "/v1/chat/completions"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
# the answer as tokens: thinking, a sentence, two calls (the engine stops at <|im_end|>)
CALLING = ("<think>", "\nneed", " weather", "\n</think>", "\n\n", "Checking", ".", "\n\n",
           "<tool_call>", "\n", '{"name": "get_weather", ', '"arguments": {"city": ', '"Paris"}}',
           "\n", "</tool_call>", "\n", "<tool_call>", "\n", '{"name": "get_time", ',
           '"arguments": {}}', "\n", "</tool_call>")
PLAIN = ("It", " is", " sunny", ".")
# what the model writes after a forced head (tool_choice names get_weather)
FORCED_TAIL = ('{"city": ', '"Oslo"}}', "\n", "</tool_call>")


def tools_client(reply, **config):
    fake = FakePipeline(reply=reply)
    return fake, make_client(fake, tool_call_parser="qwen3", reasoning_parser="qwen3", **config)


def ask(**params):
    return {"messages": [{"role": "user", "content": "Weather in Paris?"}],
            "tools": [WEATHER, TIME], **params}


def test_calls_come_back_as_tool_calls():
    fake, client = tools_client(CALLING)
    body = client.post(URL, json=ask()).json()
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] == "Checking."
    assert message["reasoning_content"] == message["reasoning"] == "need weather\n"
    calls = message["tool_calls"]
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in calls] == [("function", "get_weather", {"city": "Paris"}),
                                ("function", "get_time", {})]
    assert len({c["id"] for c in calls}) == 2 and all(c["id"].startswith("call_") for c in calls)
    # the tools reached the chat template
    assert fake.prepared[0].chat_template_kwargs == {"tools": [WEATHER, TIME]}


def test_no_call_is_a_plain_answer():
    _, client = tools_client(PLAIN)
    choice = client.post(URL, json=ask()).json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == "It is sunny." and "tool_calls" not in choice["message"]


def test_tool_choice_none_leaves_tools_out_and_text_unparsed():
    fake, client = tools_client(CALLING)
    choice = client.post(URL, json=ask(tool_choice="none")).json()["choices"][0]
    assert choice["finish_reason"] == "stop" and "<tool_call>" in choice["message"]["content"]
    assert fake.prepared[0].chat_template_kwargs is None


def test_parallel_tool_calls_false_keeps_the_first_call():
    _, client = tools_client(CALLING)
    message = client.post(URL, json=ask(parallel_tool_calls=False)).json()["choices"][0]["message"]
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"]


def test_named_tool_choice_forces_the_call_through_the_prompt():
    fake, client = tools_client(FORCED_TAIL)
    choice = {"type": "function", "function": {"name": "get_weather"}}
    body = client.post(URL, json=ask(tool_choice=choice)).json()
    kwargs = fake.prepared[0].chat_template_kwargs
    assert kwargs["tools"] == [WEATHER]  # only the named tool is rendered
    assert kwargs["assistant_prefix"] == '<tool_call>\n{"name": "get_weather", "arguments": '
    (call,) = body["choices"][0]["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    assert body["choices"][0]["finish_reason"] == "tool_calls"


def test_required_tool_choice_starts_a_call():
    fake, client = tools_client(('get_time", "arguments": {}}', "\n</tool_call>"))
    body = client.post(URL, json=ask(tool_choice="required")).json()
    assert fake.prepared[0].chat_template_kwargs["assistant_prefix"] == '<tool_call>\n{"name": "'
    assert body["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_time"


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_call_the_model_does_not_make_is_an_error(stream):
    _, client = tools_client(("not json at all",))
    response = client.post(URL, json=ask(tool_choice="required", stream=stream))
    if not stream:
        assert_error(response, 422, "tool_call_not_produced", "tool_choice")
        return
    events = [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "tool_call_not_produced"


@pytest.mark.parametrize("params,param", [
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]},
     "tools[0].function.name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": "get_weather"}, "tools"),
])
def test_bad_tools_are_400s_naming_the_element(params, param):
    _, client = tools_client(PLAIN)
    body = {"messages": [{"role": "user", "content": "x"}], **params}
    assert_error(client.post(URL, json=body), 400, param=param)


def test_tools_without_a_parser_are_refused_as_lmdeploy_does():
    client = make_client(FakePipeline(reply=CALLING))
    error = assert_error(client.post(URL, json=ask()), 400, "unsupported_parameter", "tools")
    assert "--tool-call-parser" in error["message"]
    assert client.post(URL, json=ask(tool_choice="none")).status_code == 200


def test_a_conversation_with_tool_results_is_accepted():
    fake, client = tools_client(PLAIN)
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "21C"}]},
    ]
    response = client.post(URL, json={"messages": messages, "tools": [WEATHER]})
    assert response.status_code == 200, response.text
    sent = fake.prepared[0].prompt
    assert sent[1]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert sent[2] == {"role": "tool", "content": "21C", "tool_call_id": "call_1"}


def test_bad_tool_history_is_a_400():
    _, client = tools_client(PLAIN)
    messages = [{"role": "assistant", "content": None, "tool_calls": [{"function": 3}]}]
    assert_error(client.post(URL, json={"messages": messages}), 400,
                 param="messages[0].tool_calls[0].function")


def test_server_config_refuses_other_families_parsers():
    with pytest.raises(ValueError, match="tool-call-parser llama3"):
        ServerConfig(tool_call_parser="llama3")


# ---- the official client, streaming and not, against a real uvicorn


@pytest.fixture(scope="module")
def live_url():
    fake = FakePipeline(reply=CALLING)
    app = create_app(fake, ServerConfig(tool_call_parser="qwen3", reasoning_parser="qwen3"))
    with run_live(app) as url:
        yield url


def test_openai_client_round_trip(live_url):
    client = OpenAI(api_key="x", base_url=live_url + "/v1")
    response = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER, TIME])
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    calls = choice.message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {})]
    # the next turn sends the calls and their results back
    follow = client.chat.completions.create(model="fake-model", tools=[WEATHER, TIME], messages=[
        {"role": "user", "content": "Weather in Paris?"},
        choice.message.model_dump(exclude_none=True),
        *({"role": "tool", "tool_call_id": c.id, "content": "21"} for c in calls)])
    assert follow.choices[0].finish_reason == "tool_calls"


def test_openai_client_streaming_round_trip(live_url):
    client = OpenAI(api_key="x", base_url=live_url + "/v1")
    stream = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER, TIME], stream=True)
    content, reasoning, calls, finish = "", "", {}, None
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        reasoning += getattr(delta, "reasoning_content", None) or ""
        for tc in delta.tool_calls or []:  # accumulated as OpenAI's own docs do
            slot = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            slot["id"] = tc.id or slot["id"]
            slot["name"] += (tc.function.name or "") if tc.function else ""
            slot["arguments"] += (tc.function.arguments or "") if tc.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and content == "Checking." and reasoning == "need weather\n"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert all(c["id"].startswith("call_") for c in calls.values())


def test_tool_call_responses_match_the_published_schema():
    import jsonschema

    _, client = tools_client(CALLING)
    doc = client.get("/openapi.json").json()
    schema = {"$ref": "#/components/schemas/ChatCompletion", "components": doc["components"]}
    body = client.post(URL, json=ask()).json()
    jsonschema.validate(body, schema, cls=jsonschema.Draft202012Validator)


DEEP = "[" * 5000 + "]" * 5000


@pytest.mark.parametrize("arguments", [
    DEEP,  # nesting deeper than Python's JSON parser goes: was a RecursionError, a 500
    '{"a": ' + DEEP + "}",
    '{"a": NaN}',  # not JSON: a client's parser would refuse the arguments
    '"{\\"a\\": Infinity}"',
], ids=["deep", "deep-value", "nan", "infinity-in-text"])
def test_calls_the_parser_cannot_read_are_the_models_text(arguments):
    """Adversarial model output (a prompt can ask for it) is never a failed response: a block
    whose JSON does not parse strictly is content, as written."""
    block = ('{"name": "get_time", "arguments": ', arguments, "}")
    reply = ("<tool_call>", "\n", *block, "\n", "</tool_call>")
    _, client = tools_client(reply)
    response = client.post(URL, json=ask())
    assert response.status_code == 200, response.text
    (choice,) = response.json()["choices"]
    assert choice["finish_reason"] == "stop" and "tool_calls" not in choice["message"]
    assert choice["message"]["content"] == "".join(reply)
    stream = client.post(URL, json=ask(stream=True))
    frames = [f[6:] for f in stream.text.split("\n\n") if f.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(f) for f in frames[:-1]]
    assert not any("error" in c for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "".join(reply)
