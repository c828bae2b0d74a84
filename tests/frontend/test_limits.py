"""The checks a prompt passes before any expensive work (vlmdeploy.frontend.limits): its size in
characters and pieces (RELIABILITY L15, P20) and text that cannot be encoded (L17), over every
prompt form and nesting, without a model."""

from __future__ import annotations

import time

import pytest

from vlmdeploy.errors import ContextLengthExceeded, InvalidRequestError
from vlmdeploy.frontend.limits import (
    PROMPT_CHARS_PER_TOKEN,
    check_encodable,
    check_prompt_size,
    default_max_prompt_chars,
    find_unencodable,
    has_surrogate,
    text_size,
)

LONE = ["\ud800", "\udbff", "\udc00", "\udfff", "ok \udc80 ok", "é\ud83d"]  # alone, in text
FINE = ["", "plain", "héllo wörld", "\U0001f600 emoji", "中文", "\ufffd"]


@pytest.mark.parametrize("text", LONE)
def test_lone_surrogates_are_found(text):
    assert has_surrogate(text)


@pytest.mark.parametrize("text", FINE)
def test_encodable_text_passes(text):
    assert not has_surrogate(text)
    check_encodable([{"role": "user", "content": text}], "messages")


@pytest.mark.parametrize("value,place", [
    ("\ud800", "prompt"),
    (["ok", "\udfff"], "prompt[1]"),
    ([{"role": "user", "content": "x\ud800"}], "prompt[0].content"),
    ([{"role": "system", "content": "s"}, {"role": "user", "content": [
        {"type": "text", "text": "fine"}, {"type": "text", "text": "\udc00"}]}],
     "prompt[1].content[1].text"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/a/\ud800.png"}}]}],
     "prompt[0].content[0].image_url.url"),
    (("describe", ["ok.png", "\udbff.png"]), "prompt[1][1]"),
])
def test_the_place_of_a_surrogate_is_named(value, place):
    assert find_unencodable(value, "prompt") == place
    with pytest.raises(InvalidRequestError) as info:
        check_encodable(value, "prompt")
    assert (info.value.code, info.value.param) == ("invalid_encoding", place)
    assert "\ud800" not in info.value.message and "\udfff" not in info.value.message


def test_non_text_values_are_not_text():
    assert find_unencodable([1, 2.5, None, b"\xed\xa0\x80", {"a": True}], "x") is None


def test_a_deep_value_does_not_hit_the_recursion_limit():
    deep: list = ["\ud800"]
    for _ in range(20_000):
        deep = [deep]
    assert find_unencodable(deep, "x").endswith("[0]")


def test_a_large_clean_body_is_walked_quickly():
    body = [{"role": "user", "content": [{"type": "text", "text": "ab"}] * 100_000}]
    start = time.monotonic()
    assert find_unencodable(body, "messages") is None
    assert time.monotonic() - start < 2.0


@pytest.mark.parametrize("prompt,size", [
    ("hello", (5, 1)),
    (("describe", "image.png"), (8, 3)),  # the image path is not text
    ([{"role": "system", "content": "abc"}, {"role": "user", "content": "de"}], (5, 2)),
    ([{"role": "user", "content": [{"type": "text", "text": "abc"},
                                   {"type": "image_url", "image_url": {"url": "x" * 99}}]}],
     (3, 3)),
    (["abc", "de"], (5, 0)),  # a batch of raw prompts: their characters add up
    ([{"role": "user"}, 5, None, {"content": 7}], (0, 2)),  # malformed parts count as nothing
    (None, (0, 0)),
])
def test_text_size_counts_text_and_pieces(prompt, size):
    assert text_size(prompt) == size


@pytest.mark.parametrize("prompt", [
    "x" * 101,
    [{"role": "system", "content": "x" * 60}, {"role": "user", "content": "y" * 41}],
    [{"role": "user", "content": [{"type": "text", "text": "x" * 51},
                                  {"type": "text", "text": "y" * 50}]}],
    ("x" * 101, "image.png"),
    ["x" * 60, "y" * 41],
])
def test_prompts_over_the_character_cap_are_refused(prompt):
    with pytest.raises(ContextLengthExceeded) as info:
        check_prompt_size(prompt, max_chars=100, session_len=1000, param="messages")
    assert info.value.code == "context_length_exceeded" and "100" in info.value.message
    check_prompt_size(prompt, max_chars=101, session_len=1000, param="messages")


@pytest.mark.parametrize("prompt", [
    [{"role": "user", "content": ""}] * 10,
    [{"role": "user", "content": [{"type": "text", "text": ""}] * 9}],
])
def test_prompts_of_more_pieces_than_session_len_are_refused(prompt):
    with pytest.raises(ContextLengthExceeded, match="session_len=10"):
        check_prompt_size(prompt, max_chars=100, session_len=10, param="messages")
    check_prompt_size(prompt, max_chars=100, session_len=11, param="messages")


def test_the_default_cap_is_a_multiple_of_session_len():
    assert default_max_prompt_chars(2048) == PROMPT_CHARS_PER_TOKEN * 2048 == 32768
