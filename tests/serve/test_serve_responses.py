"""Response shapes and streaming semantics of the generation routes (P19 included), stop strings,
reasoning split, logprobs, `n`, usage, `/health` and `/metrics`, against the FakePipeline."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fake_pipeline import CACHED_TOKENS, FakePipeline
from serve_helpers import assert_error, chat, make_client

URL = "/v1/chat/completions"


def events(response: Any) -> list[Any]:
    """The SSE payloads of a streamed response; the last one must be [DONE]."""
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = [f for f in response.text.split("\n\n") if f]
    assert all(f.startswith("data: ") for f in frames)
    payloads = [f[len("data: "):] for f in frames]
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


def content_of(chunks: list[dict], key: str = "content", index: int = 0) -> str:
    return "".join(c["choices"][0]["delta"].get(key) or "" for c in chunks
                   if c.get("choices") and c["choices"][0]["index"] == index)


def test_chat_completion_body(client):
    body = client.post(URL, json=chat("say hi")).json()
    assert body["object"] == "chat.completion" and body["model"] == "fake-model"
    assert body["id"].startswith("chatcmpl-") and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice == {"index": 0, "message": {"role": "assistant", "content": "Hello, world!"},
                      "logprobs": None, "finish_reason": "stop"}
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6,
                             "prompt_tokens_details": {"cached_tokens": CACHED_TOKENS}}


def test_streaming_sends_one_chunk_per_token_then_finish(client):
    chunks = events(client.post(URL, json=chat(stream=True)))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    tokens = [c["choices"][0]["delta"]["content"] for c in chunks[1:-1]]
    assert tokens == ["Hello", ",", " world", "!"]
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                        "finish_reason": "stop"}
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert len({c["id"] for c in chunks}) == 1


def test_p19_include_usage_sends_usage_last(client):
    chunks = events(client.post(URL, json=chat(stream=True, n=2,
                                               stream_options={"include_usage": True})))
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 8
    assert chunks[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": CACHED_TOKENS}


def test_p19_error_mid_stream_is_an_sse_error_frame_then_done():
    fake = FakePipeline(fail_after=2)
    chunks = events(make_client(fake).post(URL, json=chat(stream=True)))
    assert content_of(chunks) == "Hello,"
    error = chunks[-1]["error"]
    assert error["type"] == "server_error" and error["code"] == "server_error"
    assert "Traceback" not in error["message"]


def test_engine_error_without_stream_is_500_in_envelope():
    assert_error(make_client(FakePipeline(fail_after=1)).post(URL, json=chat()), 500,
                 "server_error")


def test_n_choices_are_separate_engine_requests(client, fake):
    body = client.post(URL, json=chat(n=3)).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert all(c["message"]["content"] == "Hello, world!" for c in body["choices"])
    assert len(set(fake.started)) == 3
    assert body["usage"]["prompt_tokens"] == 1 and body["usage"]["completion_tokens"] == 12


def test_n_choices_stream_interleaved(client):
    chunks = events(client.post(URL, json=chat(n=2, stream=True)))
    for index in (0, 1):
        assert content_of(chunks, index=index) == "Hello, world!"
    finishes = [c["choices"][0] for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(f["index"] for f in finishes) == [0, 1]


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_the_answer_and_aborts_the_engine_request(client, fake, stream):
    response = client.post(URL, json=chat(stop=[" wor", "zzz"], stream=stream))
    if stream:
        chunks = events(response)
        text, reason = content_of(chunks), chunks[-1]["choices"][0]["finish_reason"]
    else:
        choice = response.json()["choices"][0]
        text, reason = choice["message"]["content"], choice["finish_reason"]
    assert (text, reason) == ("Hello,", "stop")
    assert fake.aborted == fake.started  # the engine request stopped where the client's did
    assert fake.live == set()


def test_stop_string_prefix_is_held_back_until_decided(client):
    # "," could start the stop string ", x" until " world" arrives
    chunks = events(client.post(URL, json=chat(stop=", x", stream=True)))
    assert content_of(chunks) == "Hello, world!"
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:3]] == ["Hello", ", world"]


def test_stop_string_across_tokens(client):
    body = client.post(URL, json=chat(stop="o, w")).json()
    assert body["choices"][0]["message"]["content"] == "Hell"


def test_logprobs_shape(client):
    body = client.post(URL, json=chat(logprobs=True, top_logprobs=2, max_tokens=2)).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in content] == ["Hello", ","]
    first = content[0]
    assert first["logprob"] == -0.25 and first["bytes"] == list(b"Hello")
    assert [t["token"] for t in first["top_logprobs"]] == ["Hello", "<alt>"]
    assert [t["logprob"] for t in first["top_logprobs"]] == [-0.25, -1.5]
    one = client.post(URL, json=chat(logprobs=True, top_logprobs=1, max_tokens=1)).json()
    assert len(one["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 1


def test_logprobs_stream_with_each_token(client):
    chunks = events(client.post(URL, json=chat(logprobs=True, stream=True, max_tokens=2)))
    tokens = [c["choices"][0]["logprobs"]["content"][0]["token"] for c in chunks[1:3]]
    assert tokens == ["Hello", ","]


def test_return_token_ids(client, fake):
    body = client.post(URL, json=chat(return_token_ids=True, max_tokens=2)).json()
    ids = body["choices"][0]["token_ids"]
    assert fake.tokenizer.decode(ids) == "Hello,"
    chunks = events(client.post(URL, json=chat(return_token_ids=True, stream=True, max_tokens=2)))
    streamed = [i for c in chunks for i in c["choices"][0].get("token_ids", [])]
    assert streamed == ids


THINKING = ("<think>", "\n", "let me ", "see", "</think>", "\n\n", "It is ", "42.")


@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_parser_splits_think_block(stream):
    fake = FakePipeline(reply=THINKING)
    client = make_client(fake, reasoning_parser="intern-s1")
    response = client.post(URL, json=chat(stream=stream))
    if stream:
        chunks = events(response)
        reasoning, content = content_of(chunks, "reasoning_content"), content_of(chunks)
        assert content_of(chunks, "reasoning") == reasoning  # vLLM's field, the same text
        assert not any("<think>" in json.dumps(c) or "</think>" in json.dumps(c) for c in chunks)
    else:
        message = response.json()["choices"][0]["message"]
        reasoning, content = message["reasoning_content"], message["content"]
        assert message["reasoning"] == reasoning  # vLLM's field, the same text
    assert (reasoning, content) == ("let me see", "It is 42.")


def test_without_parser_think_tags_stay_in_content():
    client = make_client(FakePipeline(reply=THINKING))
    message = client.post(URL, json=chat()).json()["choices"][0]["message"]
    assert "reasoning_content" not in message
    assert message["content"] == "".join(THINKING)


def test_reasoning_parser_plain_answer_has_no_reasoning():
    client = make_client(FakePipeline(), reasoning_parser="qwen3")
    message = client.post(URL, json=chat()).json()["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "Hello, world!", "reasoning_content": None,
                       "reasoning": None}


def test_r1_style_parser_starts_inside_reasoning():
    reply = ("step one", "</think>", "answer")
    client = make_client(FakePipeline(reply=reply), reasoning_parser="deepseek-r1")
    message = client.post(URL, json=chat()).json()["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == ("step one", "answer")
    off = client.post(URL, json=chat(chat_template_kwargs={"enable_thinking": False})).json()
    assert off["choices"][0]["message"]["content"] == "step one</think>answer"


# ---- /v1/completions ---------------------------------------------------------------------------


def test_completions_body_and_indexing(client, fake):
    body = client.post("/v1/completions", json={"prompt": ["one", "two"], "n": 2,
                                                "max_tokens": 3}).json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert all(c["text"] == "Hello, world" and c["finish_reason"] == "length"
               for c in body["choices"])
    assert [p.prompt for p in fake.prepared] == ["one", "two"]
    assert all(p.extra["do_preprocess"] is False for p in fake.prepared)  # no chat template
    assert body["usage"]["prompt_tokens"] == 2 and body["usage"]["completion_tokens"] == 12


def test_completions_default_max_tokens_is_16(client, fake):
    client.post("/v1/completions", json={"prompt": "x"})
    assert fake.prepared[-1].gen_config.max_new_tokens == 16


def test_completions_stream_and_logprobs(client):
    response = client.post("/v1/completions", json={
        "prompt": "x", "stream": True, "logprobs": 1, "stream_options": {"include_usage": True}})
    chunks = events(response)
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    assert "".join(texts) == "Hello, world!"
    first = chunks[0]["choices"][0]["logprobs"]
    assert first["tokens"] == ["Hello"] and first["token_logprobs"] == [-0.25]
    assert first["top_logprobs"] == [{"Hello": -0.25}] and first["text_offset"] == [0]
    assert chunks[1]["choices"][0]["logprobs"]["text_offset"] == [5]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize("extra,param", [({"echo": True}, "echo"), ({"suffix": "x"}, "suffix"),
                                         ({"best_of": 3}, "best_of")])
def test_completions_refuse_unsupported(client, extra, param):
    assert_error(client.post("/v1/completions", json={"prompt": "x", **extra}), 400,
                 "unsupported_parameter", param)


@pytest.mark.parametrize("prompt", [[], 5, [1, 2], None])
def test_completions_bad_prompt(client, prompt):
    assert_error(client.post("/v1/completions", json={"prompt": prompt}), 400, None, "prompt")


# ---- /v1/models, /health, /metrics -------------------------------------------------------------


def test_models_list(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [(m["id"], m["object"], m["max_model_len"]) for m in body["data"]] == [
        ("fake-model", "model", 4096)]


def test_health_reports_a_dead_engine(client, fake):
    assert client.get("/health").status_code == 200
    fake.dead = True
    response = client.get("/health")
    assert_error(response, 503, "service_unavailable")
    assert response.headers["retry-after"]
    fake.dead = False  # once dead, the server stays unavailable
    assert client.get("/health").status_code == 503
    assert_error(client.post(URL, json=chat()), 503, "service_unavailable")


def test_engine_death_during_a_request_fails_fast():
    fake, died = FakePipeline(), []
    from fastapi.testclient import TestClient

    from vlmdeploy.serve import ServerConfig, create_app

    client = TestClient(create_app(fake, ServerConfig(), on_engine_dead=lambda: died.append(1)))
    fake.dead = True
    assert_error(client.post(URL, json=chat()), 503, "service_unavailable")
    assert died == [1]
    assert client.get("/health").status_code == 503


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_metrics_use_vllm_names(client):
    client.post(URL, json=chat("a b c", max_tokens=3, ignore_eos=True))
    client.post(URL, json=chat("d", stream=True))
    text = client.get("/metrics").text
    assert _metric(text, "vllm:prompt_tokens_total") == 3 + 1
    assert _metric(text, "vllm:generation_tokens_total") == 3 + 4
    for name in ("vllm:time_to_first_token_seconds", "vllm:time_per_output_token_seconds",
                 "vllm:e2e_request_latency_seconds"):
        assert _metric(text, name + "_count") == 2
    assert _metric(text, "vllm:num_requests_running") == 0
    assert _metric(text, "vllm:num_requests_waiting") == 0
    assert _metric(text, "vllm:kv_cache_usage_perc") == 0
    assert _metric(text, "vllm:num_preemptions_total") == 2
    assert 'model_name="fake-model"' in text
    assert "_created" not in text


def test_metrics_survive_a_dead_engine(client, fake):
    fake.dead = True
    response = client.get("/metrics")
    assert response.status_code == 200
    assert "vllm:num_requests_running{" not in response.text


HARMONY = ("<|channel|>analysis<|message|>", "the user ", "asks for 42", "<|end|>",
           "<|start|>assistant<|channel|>final<|message|>", "It is ", "42.", "<|return|>")


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("name", ["gpt-oss", "openai_gptoss"])
def test_gpt_oss_reasoning_channel_is_reasoning_content(stream, name):
    """GPT-OSS's harmony analysis channel reaches reasoning_content (its markers are special
    tokens, so the answer is decoded with them kept), the final channel content."""
    fake = FakePipeline(reply=HARMONY)
    client = make_client(fake, reasoning_parser=name)
    response = client.post(URL, json=chat(stream=stream))
    if stream:
        chunks = events(response)
        reasoning, content = content_of(chunks, "reasoning_content"), content_of(chunks)
        assert not any("<|channel|>" in json.dumps(c) for c in chunks)
    else:
        message = response.json()["choices"][0]["message"]
        reasoning, content = message["reasoning_content"], message["content"]
        assert message.get("tool_calls") in (None, [])
    assert (reasoning, content) == ("the user asks for 42", "It is 42.")
    assert fake.prepared[-1].gen_config.skip_special_tokens is False
