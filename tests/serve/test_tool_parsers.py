"""Tool-call parsers (`vlmdeploy.serve.tool_parsers`): the same answer fed whole or in any split
gives the same content and calls; markers never leak; text that is not a call stays content."""

from __future__ import annotations

import json

import pytest

from vlmdeploy.serve.reasoning import ReasoningSplitter
from vlmdeploy.serve.tool_parsers import (
    ChoiceParser,
    HarmonyToolParser,
    JsonToolParser,
    check_tool_parser,
)

TWO_CALLS = ('I will look both up.\n\n<tool_call>\n{"name": "get_weather", "arguments": '
             '{"city": "Paris"}}\n</tool_call>\n<tool_call>\n{"name": "get_weather", '
             '"arguments": {"city": "Zürich", "unit": "c"}}\n</tool_call>')


def run(parser, text: str, cuts: list[int]):
    """Feed `text` split at `cuts`; returns (reasoning, content, [(name, args)])."""
    pieces, last = [], 0
    for cut in [*cuts, len(text)]:
        pieces.append(text[last:cut])
        last = cut
    reasoning = content = ""
    calls = []
    for i, piece in enumerate(pieces):
        out = parser.feed(piece, last=i == len(pieces) - 1)
        reasoning, content = reasoning + out.reasoning, content + out.content
        calls += [(c.name, json.loads(c.arguments)) for c in out.calls]
    return reasoning, content, calls


def splits(text: str):
    yield []
    yield list(range(1, len(text)))  # one character at a time
    for step in (3, 7, 11):
        yield list(range(step, len(text), step))


@pytest.mark.parametrize("cut", range(5), ids=["whole", "chars", "by3", "by7", "by11"])
def test_json_calls_in_any_split(cut):
    cuts = list(splits(TWO_CALLS))[cut]
    reasoning, content, calls = run(ChoiceParser(None, JsonToolParser()), TWO_CALLS, cuts)
    assert content == "I will look both up."
    assert calls == [("get_weather", {"city": "Paris"}),
                     ("get_weather", {"city": "Zürich", "unit": "c"})]
    assert reasoning == ""


def test_text_without_calls_is_unchanged():
    text = "No tools needed.\n  Answer: 4 < 5 and <tool is not a tag\n"
    for cuts in splits(text):
        assert run(ChoiceParser(None, JsonToolParser()), text, cuts) == ("", text, [])


@pytest.mark.parametrize("bad", [
    '<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>',  # broken JSON
    '<tool_call>\n["not", "an", "object"]\n</tool_call>',
    '<tool_call>\n{"arguments": {}}\n</tool_call>',  # no name
    '<tool_call>\n{"name": "f", "arguments": 3}\n</tool_call>',
    # not strict JSON: a client's parser would refuse the arguments
    '<tool_call>\n{"name": "f", "arguments": {"a": NaN}}\n</tool_call>',
    '<tool_call>\n{"name": "f", "arguments": "{\\"a\\": -Infinity}"}\n</tool_call>',
    # deeper than Python's JSON parser goes (a RecursionError before)
    '<tool_call>\n{"name": "f", "arguments": {"a": ' + "[" * 5000 + "]" * 5000 + "}}\n</tool_call>",
    '<tool_call>\n' + '{"a": ' * 5000 + "1" + "}" * 5000 + "\n</tool_call>",
], ids=lambda bad: bad[:60] if len(bad) < 200 else "too-deep")
def test_a_block_that_is_not_a_call_stays_content(bad):
    text = "Before " + bad
    assert run(ChoiceParser(None, JsonToolParser()), text, []) == ("", text.rstrip(), [])


def test_an_unclosed_block_at_the_end_is_still_a_call():
    text = '<tool_call>\n{"name": "f", "arguments": {"x": [1, 2]}}\n'  # ended by the stop token
    assert run(ChoiceParser(None, JsonToolParser()), text, [5]) == ("", "", [("f", {"x": [1, 2]})])


def test_string_arguments_and_parameters_key_are_accepted():
    text = ('<tool_call>{"name": "a", "arguments": "{\\"k\\": 1}"}</tool_call>'
            '<tool_call>{"name": "b", "parameters": {"k": 2}}</tool_call>')
    assert run(ChoiceParser(None, JsonToolParser()), text, [])[2] == [("a", {"k": 1}),
                                                                     ("b", {"k": 2})]


def test_reasoning_then_calls():
    text = "<think>\nThe user wants weather.\n</think>\n\n" + TWO_CALLS
    for cuts in splits(text):
        parser = ChoiceParser(ReasoningSplitter(), JsonToolParser())
        reasoning, content, calls = run(parser, text, cuts)
        assert reasoning == "The user wants weather.\n"
        assert content == "I will look both up." and len(calls) == 2


def test_a_call_inside_reasoning_is_reasoning():
    text = '<think>maybe <tool_call>{"name": "f", "arguments": {}}</tool_call></think>Done.'
    parser = ChoiceParser(ReasoningSplitter(), JsonToolParser())
    reasoning, content, calls = run(parser, text, [])
    assert "<tool_call>" in reasoning and content == "Done." and calls == []


def test_a_forced_prefix_is_parsed_as_if_generated():
    parser = ChoiceParser(ReasoningSplitter(), JsonToolParser(),
                          prefix='<tool_call>\n{"name": "get_weather", "arguments": ')
    assert parser.splitter is None  # a forced call starts the answer: no reasoning block
    assert run(parser, '{"city": "Oslo"}}\n</tool_call>', [3]) == (
        "", "", [("get_weather", {"city": "Oslo"})])


HARMONY = ("<|channel|>analysis<|message|>Need the weather.<|end|>"
           "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
           '<|message|>{"city": "Paris"}<|call|>')


@pytest.mark.parametrize("cut", range(5), ids=["whole", "chars", "by3", "by7", "by11"])
def test_harmony_reasoning_and_call_in_any_split(cut):
    cuts = list(splits(HARMONY))[cut]
    parser = ChoiceParser(ReasoningSplitter(), HarmonyToolParser())
    assert parser.splitter is None
    assert run(parser, HARMONY, cuts) == ("Need the weather.", "",
                                          [("get_weather", {"city": "Paris"})])


def test_harmony_final_answer_and_missing_stop_token():
    text = ("<|channel|>analysis<|message|>Easy.<|end|><|start|>assistant<|channel|>final"
            "<|message|>It is 4.")  # <|return|> is the stop token: not in the text
    for cuts in splits(text):
        assert run(ChoiceParser(None, HarmonyToolParser()), text, cuts) == (
            "Easy.", "It is 4.", [])


@pytest.mark.parametrize("body", ["[" * 5000 + "]" * 5000, '{"a": NaN}'], ids=["deep", "nan"])
def test_harmony_arguments_that_are_not_strict_json_are_content(body):
    text = f"<|channel|>commentary to=functions.f <|constrain|>json<|message|>{body}<|call|>"
    assert run(ChoiceParser(None, HarmonyToolParser()), text, []) == ("", body, [])


def test_harmony_without_markers_is_content():
    assert run(ChoiceParser(None, HarmonyToolParser()), "plain", [2]) == ("", "plain", [])


def test_parser_names():
    for name in (None, "qwen3", "qwen", "qwen2d5", "hermes", "gpt-oss", "openai"):
        check_tool_parser(name)
    with pytest.raises(ValueError, match="another model family"):
        check_tool_parser("llama3")
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        check_tool_parser("nope")
