"""The two streaming text transforms, checked against their whole-text results under every way of
cutting the text into deltas: stop-string matching and the `<think>` reasoning splitter."""

from __future__ import annotations

import random

import pytest

from vlmdeploy.frontend.stop_words import StopMatcher
from vlmdeploy.serve.reasoning import REASONING_PARSERS, ReasoningSplitter, split_all


def random_cuts(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), k=rng.randint(0, len(text) - 1)))
    return [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def stop_stream(pieces: list[str], stops: list[str]) -> tuple[str, bool]:
    matcher, out = StopMatcher(stops), []
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


@pytest.mark.parametrize("text,stops,expected", [
    ("Hello, world!", [", w"], ("Hello", True)),
    ("Hello, world!", ["xyz"], ("Hello, world!", False)),
    ("aaab", ["aab"], ("a", True)),
    ("abcabd", ["abd", "ca"], ("ab", True)),
    ("the end.", ["end", "the"], ("", True)),
    ("no stops", [], ("no stops", False)),
])
def test_stop_strings_under_every_chunking(text, stops, expected):
    rng = random.Random(0)
    for _ in range(200):
        assert stop_stream(random_cuts(text, rng), stops) == expected


def test_stop_matcher_never_emits_part_of_a_stop_string():
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("abc ST") == ("abc ", False)
    assert matcher.feed("O") == ("", False)
    assert matcher.feed("x") == ("STOx", False)


THINK = "<think>\nweigh options</think>\n\nThe answer is 42."


@pytest.mark.parametrize("text,starts,expected", [
    (THINK, False, ("weigh options", "The answer is 42.")),
    ("plain answer <b>", False, (None, "plain answer <b>")),
    ("reason</think>answer", True, ("reason", "answer")),
    ("<think>reason</think>answer", True, ("reason", "answer")),
    ("unfinished <think>still thinking", False, ("still thinking", "unfinished ")),
    ("a</think>b<think>c</think>", True, ("a", "b<think>c</think>")),
])
def test_reasoning_split_under_every_chunking(text, starts, expected):
    assert split_all(ReasoningSplitter(starts), text) == expected
    rng = random.Random(1)
    for _ in range(200):
        splitter, reasoning, content = ReasoningSplitter(starts), [], []
        for piece in random_cuts(text, rng):
            r, c = splitter.feed(piece)
            reasoning.append(r)
            content.append(c)
        r, c = splitter.flush()
        assert ("".join(reasoning) + r or None, "".join(content) + c) == expected


def test_no_tag_fragment_is_ever_emitted():
    splitter = ReasoningSplitter()
    assert splitter.feed("<th") == ("", "")
    assert splitter.feed("ink>x") == ("x", "")


def test_parser_names_include_lmdeploys():
    assert {"intern-s1", "qwen-qwq", "deepseek-r1", "qwen3", "default"} <= set(REASONING_PARSERS)
    assert ReasoningSplitter.for_parser("deepseek-r1", None).feed("r</think>c") == ("r", "c")
    off = ReasoningSplitter.for_parser("deepseek-r1", False)  # thinking switched off
    assert off.feed("r</think>c") == ("", "r</think>c")
