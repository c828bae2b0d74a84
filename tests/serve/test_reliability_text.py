"""RELIABILITY rows about text: seeded sampling that repeats through the server (L13, on the real
pipeline with a tiny checkpoint, CPU), and the parsers of model output fed 500 KB of adversarial
text (L14: the reasoning splitter, the stop-string matcher and the tool-call parsers)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from serve_helpers import chat, run_live

from vlmdeploy.frontend.stop_words import StopMatcher
from vlmdeploy.serve import create_app
from vlmdeploy.serve.protocol import MAX_STOP_CHARS, MAX_STOP_STRINGS
from vlmdeploy.serve.reasoning import ReasoningSplitter
from vlmdeploy.serve.tool_parsers import ChoiceParser, HarmonyToolParser, JsonToolParser

URL = "/v1/chat/completions"


# ---- L13: seeded sampling ----------------------------------------------------------------------


def test_l13_the_same_seed_gives_the_same_answer_serially_and_under_concurrency(real_pipe):
    """Serially, a seeded request at temperature 0.8 repeats exactly. Each request has its own
    generator, so it repeats under concurrent traffic too (documented in docs/reliability.md)."""
    seeded = chat("tell me a story", seed=1234, temperature=0.8, max_tokens=24, ignore_eos=True)
    with run_live(create_app(real_pipe)) as url:
        with httpx.Client(base_url=url, timeout=60) as http:
            first, second = (http.post(URL, json=seeded).json() for _ in range(2))
            other = http.post(URL, json={**seeded, "seed": 4321}).json()
        text = first["choices"][0]["message"]["content"]
        assert second["choices"][0]["message"]["content"] == text
        assert other["choices"][0]["message"]["content"] != text  # the seed matters

        async def crowd() -> list[dict]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                noise = [chat(f"noise {i}", temperature=1.0, max_tokens=24) for i in range(6)]
                replies = await asyncio.gather(*(http.post(URL, json=b)
                                                 for b in [seeded, *noise, seeded, seeded]))
            return [r.json() for r in replies]

        replies = asyncio.run(crowd())
    for reply in (replies[0], replies[-2], replies[-1]):
        assert reply["choices"][0]["message"]["content"] == text


# ---- L14: parsers of model output on adversarial text ------------------------------------------

OUTPUT_CHARS = 500_000
DELTA = "aaaa"  # a token's worth of text


def test_l14_reasoning_split_of_500kb_adversarial_output_is_linear():
    """Tag fragments that never complete, in and out of a reasoning block: the splitter holds
    back at most a tag's length, so 500 KB cost a fraction of a second."""
    for fragment in ("<thi", "</thin", "<", "a<think"):
        for inside in (False, True):
            splitter = ReasoningSplitter(starts_in_reasoning=inside)
            start, total = time.perf_counter(), 0
            for _ in range(OUTPUT_CHARS // len(fragment)):
                reasoning, content = splitter.feed(fragment)
                total += len(reasoning) + len(content)
            reasoning, content = splitter.flush()
            total += len(reasoning) + len(content)
            assert time.perf_counter() - start < 3.0, (fragment, inside)
            assert total <= OUTPUT_CHARS  # tags are dropped, nothing is invented


def test_l14_stop_strings_on_500kb_adversarial_output_are_linear():
    """The worst stop strings the server accepts (16 of 1,024 characters): one whose long prefix
    the output keeps matching, so text is held back, and others that share no prefix with it.
    Five times the text costs about five times the time (the old matcher was quadratic), and all
    of it comes back."""
    stops = ["a" * (MAX_STOP_CHARS - 1) + "b"] + ["b" * MAX_STOP_CHARS] * (MAX_STOP_STRINGS - 1)

    def run(chars: int) -> float:
        matcher = StopMatcher(stops)
        start, out = time.perf_counter(), 0
        for _ in range(chars // len(DELTA)):
            text, stopped = matcher.feed(DELTA)
            out += len(text)
            assert not stopped
        assert out + len(matcher.flush()) == chars
        return time.perf_counter() - start

    small = min(run(OUTPUT_CHARS // 5) for _ in range(2))
    large = run(OUTPUT_CHARS)
    assert large < 10 * small + 0.05 and large < 30.0, (small, large)  # linear: ~5x


CALL_BODY = '<|start|>assistant<|channel|>commentary to=functions.f<|message|>'


@pytest.mark.parametrize("parser,prefix,fragment", [
    (JsonToolParser, "<tool_call>", '{"a": [1'),  # a call that never closes
    (JsonToolParser, "", "<tool_ca"),  # open tags that never complete
    (JsonToolParser, "", "    "),  # blanks, held back in case a call follows
    (HarmonyToolParser, "<|start|>assistant", "<|chan"),  # a header that never ends
    (HarmonyToolParser, CALL_BODY, '{"a"'),  # a call's arguments that never end
    (HarmonyToolParser, "<|start|>assistant<|channel|>final<|message|>", "<|en"),
], ids=["json-open-call", "json-tag-fragments", "json-blanks", "harmony-header",
        "harmony-call-body", "harmony-end-fragments"])
def test_l14_tool_call_parsers_on_adversarial_output_are_linear(parser, prefix, fragment):
    """Each delta is searched once, whatever was gathered before it: five times the text costs
    about five times the time (it was quadratic: 500 KB of an unclosed call took 13 s), and
    nothing the model wrote is lost."""

    def run(chars: int) -> tuple[float, int]:
        text = (fragment * (chars // len(fragment) + 1))[:chars]
        choice = ChoiceParser(None, parser(), prefix=prefix)
        start, seen = time.perf_counter(), 0
        for i in range(0, chars, len(DELTA)):
            out = choice.feed(text[i:i + len(DELTA)], last=i + len(DELTA) >= chars)
            seen += len(out.content) + len(out.reasoning) + sum(len(c.arguments) for c in out.calls)
        return time.perf_counter() - start, seen

    small = min(run(OUTPUT_CHARS // 5)[0] for _ in range(2))
    large, seen = min(run(OUTPUT_CHARS) for _ in range(2))
    assert large < 10 * small + 0.05, (small, large)  # linear: ~5x; quadratic: ~25x
    if fragment.strip():  # blanks around nothing are not content
        assert seen >= OUTPUT_CHARS - 16  # all of it comes back (a partial tag may be dropped)
