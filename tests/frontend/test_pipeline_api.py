"""The LMDeploy-shaped Python API on a tiny checkpoint: batch, streaming, chat sessions, sampling
knobs and the async interface the HTTP server uses."""

from __future__ import annotations

import asyncio
import time

import pytest

from vlmdeploy import GenerationConfig, PytorchEngineConfig, Response, pipeline


@pytest.fixture(scope="module")
def pipe(tiny_ckpts):
    with pipeline(tiny_ckpts["original"], PytorchEngineConfig(session_len=4096)) as p:
        yield p


def wait_idle(pipe, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while pipe.stats()["num_running"] or pipe.stats()["num_waiting"]:
        assert time.monotonic() < deadline, "engine did not go idle"
        time.sleep(0.01)


def test_single_and_batch_shapes(pipe, images):
    gen = GenerationConfig(max_new_tokens=5)
    single = pipe("hello", gen_config=gen)
    assert isinstance(single, Response) and single.index == 0
    batch = pipe(
        ["hello", ("describe", images[0]), [{"role": "user", "content": "hi"}]], gen_config=gen
    )
    assert [r.index for r in batch] == [0, 1, 2]
    assert (
        batch[0].token_ids == single.token_ids
    )  # greedy is deterministic across batch compositions
    per_prompt = pipe(
        ["a", "b"],
        gen_config=[GenerationConfig(max_new_tokens=2), GenerationConfig(max_new_tokens=3)],
    )
    assert [r.generate_token_len for r in per_prompt] == [2, 3]


def test_stream_infer_deltas_add_up_to_infer(pipe, images):
    gen = GenerationConfig(max_new_tokens=12)
    prompts = ["tell me", ("describe", images[2])]
    full = pipe(prompts, gen_config=gen)
    texts, ids = ["", ""], [[], []]
    for r in pipe.stream_infer(prompts, gen_config=gen):
        texts[r.index] += r.text
        ids[r.index] += r.token_ids
    assert texts == [r.text for r in full]
    assert ids == [r.token_ids for r in full]


def test_breaking_out_of_a_stream_frees_its_blocks(pipe):
    stream = pipe.stream_infer(["a long story"], gen_config=GenerationConfig(max_new_tokens=500))
    next(stream)
    stream.close()
    wait_idle(pipe)
    assert pipe.engine.core.blocks.num_free == pipe.engine.core.num_blocks


def test_chat_keeps_history(pipe, images):
    gen = GenerationConfig(top_k=50, top_p=0.95, temperature=0.6, max_new_tokens=6)
    sess = pipe.chat(("describe this image", images[0]), gen_config=gen)
    first = sess.response
    sess = pipe.chat("What is the woman doing?", session=sess, gen_config=gen)
    assert sess.step == 2 and len(sess.messages) == 4
    assert sess.response.input_token_len > first.input_token_len + first.generate_token_len


def test_random_seed_reproduces_sampling(pipe):
    def sample(seed):
        gen = GenerationConfig(
            do_sample=True, temperature=1.0, top_k=0, random_seed=seed, max_new_tokens=16
        )
        return pipe("once upon a time", gen_config=gen).token_ids

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_logprobs_are_returned_per_token(pipe):
    r = pipe("hi", gen_config=GenerationConfig(max_new_tokens=4, logprobs=3))
    assert len(r.logprobs) == 4
    for tok, lp in zip(r.token_ids, r.logprobs, strict=True):
        assert tok in lp and max(lp.values()) == lp[tok]  # greedy picks the most likely token
        assert all(v <= 0 for v in lp.values())


def test_stop_words_and_min_new_tokens(pipe):
    base = pipe("count", gen_config=GenerationConfig(max_new_tokens=10))
    word = base.text[len(base.text) // 2 :][:2] or base.text
    stopped = pipe("count", gen_config=GenerationConfig(max_new_tokens=10, stop_words=[word]))
    assert stopped.finish_reason == "stop"
    assert word not in stopped.text and base.text.startswith(stopped.text)
    with_min = pipe("count", gen_config=GenerationConfig(max_new_tokens=6, min_new_tokens=6))
    assert with_min.generate_token_len == 6


def test_async_prepare_and_generate(pipe, images):
    async def main():
        gen = GenerationConfig(max_new_tokens=6)
        req = await pipe.prepare(("describe", images[0]), gen)
        outs = [o async for o in pipe.generate_prepared(req, session_id=10_001)]
        assert outs[-1].finish_reason == "length" and outs[-1].generate_token_len == 6
        assert outs[-1].input_token_len == req.input_token_len
        # leaving a stream early aborts the request
        req2 = await pipe.prepare("a story", GenerationConfig(max_new_tokens=400))
        agen = pipe.generate_prepared(req2, session_id=10_002)
        await agen.__anext__()
        await agen.aclose()

    asyncio.run(main())
    wait_idle(pipe)
    assert pipe.engine.core.blocks.num_free == pipe.engine.core.num_blocks


def test_use_tqdm(pipe, capsys):
    out = pipe(["a", "b"], gen_config=GenerationConfig(max_new_tokens=2), use_tqdm=True)
    assert len(out) == 2
    assert "2/2" in capsys.readouterr().err


def test_streamed_text_never_leaks_part_of_a_stop_word(pipe):
    base = pipe("count", gen_config=GenerationConfig(max_new_tokens=12)).text
    stop = base[3:9]  # spans several tokens
    assert len(stop) == 6
    streamed = "".join(
        r.text
        for r in pipe.stream_infer(
            ["count"], gen_config=GenerationConfig(max_new_tokens=12, stop_words=[stop])
        )
    )
    assert streamed == base[: base.index(stop)]
    kept = pipe(
        "count",
        gen_config=GenerationConfig(
            max_new_tokens=12, stop_words=[stop], include_stop_str_in_output=True
        ),
    )
    assert kept.text == base[: base.index(stop) + len(stop)] and kept.finish_reason == "stop"


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]


def test_tools_and_template_kwargs_reach_the_chat_template(pipe):
    """LMDeploy's pipeline passes tools=, enable_thinking= and chat_template_kwargs= on to the
    template: the prompt is the one the server builds from the same fields."""
    gen = GenerationConfig(max_new_tokens=2)
    plain = pipe("weather in Paris?", gen_config=gen)
    for kwargs in ({"tools": TOOLS}, {"chat_template_kwargs": {"tools": TOOLS}}):
        with_tools = pipe("weather in Paris?", gen_config=gen, **kwargs)
        served = pipe.prepare_sync("weather in Paris?", gen, chat_template_kwargs={"tools": TOOLS})
        assert with_tools.input_token_len == served.input_token_len > plain.input_token_len
    thinking = pipe("weather in Paris?", gen_config=gen, enable_thinking=True)
    assert thinking.input_token_len > plain.input_token_len
    streamed = list(pipe.stream_infer(["weather in Paris?"], gen_config=gen, tools=TOOLS))
    assert streamed[0].input_token_len == served.input_token_len
    session = pipe.chat("weather in Paris?", gen_config=gen, tools=TOOLS)
    assert session.response.input_token_len == served.input_token_len


@pytest.mark.parametrize("kwargs", [
    {"chat_template_kwargs": {"tokenize": True}},
    {"tools": {"name": "get_weather"}},
    {"tool": TOOLS},
])
def test_bad_template_kwargs_are_refused(pipe, kwargs):
    with pytest.raises(TypeError):
        pipe("hi", gen_config=GenerationConfig(max_new_tokens=1), **kwargs)


def test_greedy_decoding_and_the_repetition_penalty_as_lmdeploy_has_them(pipe):
    """do_sample=False is LMDeploy's greedy decoding, which drops the repetition penalty; a
    sampling config at temperature 0 (what the server makes of OpenAI's temperature 0, as
    LMDeploy's server does) decodes greedily with it, as LMDeploy's and vLLM's servers do."""
    plain = GenerationConfig(max_new_tokens=24, ignore_eos=True)
    greedy = pipe("count to ten", gen_config=plain).token_ids
    dropped = dict(max_new_tokens=24, ignore_eos=True, repetition_penalty=3.0)
    assert pipe("count to ten", gen_config=GenerationConfig(**dropped)).token_ids == greedy
    kept = GenerationConfig(do_sample=True, temperature=0.0, **dropped)
    first, second = (pipe("count to ten", gen_config=kept).token_ids for _ in range(2))
    assert first == second != greedy  # greedy, and penalised
    counts = {t: greedy.count(t) for t in greedy}
    assert max(counts.values()) > 1  # the greedy answer repeats a token the penalty holds back
