"""The synthetic task generator: deterministic per seed, and every answer true of the drawn pixels.

Answers are checked against a scene read back from the rendered image (``synthetic_pixels``), not
against the generator's own scene objects.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter

import numpy as np
import pytest
from synthetic_pixels import Blob, parse

from vlmdeploy.synthetic.eval import EvalReport, evaluate, min_correct
from vlmdeploy.synthetic.questions import (
    COLOURS,
    KINDS,
    SHAPES,
    exact_match,
    generate_questions,
    make_question,
    questions_about,
    to_openai_messages,
)
from vlmdeploy.vl.constants import IMAGE_TOKEN

WORD_COUNTS = {"a": 1, "two": 2, "three": 3, "four": 4}


def _signature(q) -> tuple:
    texts = [m["content"] if isinstance(m["content"], str) else
             [p.get("text") for p in m["content"]] for m in q.messages]
    pixels = [np.asarray(im).tobytes() for im in q.images]
    return q.kind, q.answer, repr(texts), pixels


def test_same_seed_same_questions():
    a, b = generate_questions(11, 12), generate_questions(11, 12)
    assert [_signature(x) for x in a] == [_signature(y) for y in b]


def test_other_seed_other_questions():
    a, b = generate_questions(11, 12), generate_questions(12, 12)
    assert [_signature(x) for x in a] != [_signature(y) for y in b]


def test_kinds_cycle_and_sizes_vary():
    qs = generate_questions(3, 24)
    assert [q.kind for q in qs] == [KINDS[i % len(KINDS)] for i in range(24)]
    sizes = {im.size for q in qs for im in q.images}
    assert len(sizes) > 20
    assert all(200 <= s <= 900 for size in sizes for s in size)
    ratios = [w / h for w, h in sizes]
    assert min(ratios) < 0.6 and max(ratios) > 1.6  # tall and wide images, so tiling varies


def _parse_description(text: str) -> list[tuple[str, str, int]]:
    """[(shape, colour, count)] of "two red circles, a blue square and a green star"."""
    groups = []
    for phrase in re.split(r", | and ", text):
        word, colour, noun = phrase.split(" ")
        n = WORD_COUNTS[word]
        shape = noun.removesuffix("s") if n > 1 else noun
        assert shape in SHAPES and colour in COLOURS and noun.endswith("s") == (n > 1)
        groups.append((shape, colour, n))
    return groups


def _expected_single(question_text: str, blobs: list[Blob]) -> str | None:
    """The answer a correct reader of ``blobs`` gives, or None for a description question."""
    if question_text == "How many shapes are there?":
        return str(len(blobs))
    if m := re.match(r"How many (\w+)s are (?:there|in the image)\?", question_text):
        return str(sum(b.shape == m[1] for b in blobs))
    if m := re.match(r"What colou?r is the (\w+)\?", question_text):
        (blob,) = [b for b in blobs if b.shape == m[1]]  # the question needs a unique one
        return blob.colour
    if m := re.match(r"Where is the (\w+)\?", question_text):
        (blob,) = [b for b in blobs if b.shape == m[1]]
        return blob.slot
    return None


def _check_description(answer: str, blobs: list[Blob]) -> None:
    groups = _parse_description(answer)
    counted = Counter({(shape, colour): n for shape, colour, n in groups})
    assert len(counted) == len(groups)  # each (shape, colour) group named once
    assert counted == Counter((b.shape, b.colour) for b in blobs)
    order = [(SHAPES.index(shape), COLOURS.index(colour)) for shape, colour, _ in groups]
    assert order == sorted(order)  # canonical order: by shape, then colour


def _text_parts(message) -> str:
    content = message["content"]
    return content if isinstance(content, str) else "".join(
        p["text"] for p in content if p["type"] == "text")


@pytest.mark.parametrize("seed", [5, 6])
def test_answers_match_the_pixels(seed):
    for q in generate_questions(seed, 18):
        _check_against_pixels(q)


def test_questions_about_one_scene_share_its_image_and_are_true():
    rng = random.Random("about")
    for index in range(6):
        base = make_question(3, index, "describe")
        image = base.images[0]
        extra = questions_about(rng, base.scenes[0], image, 8)
        assert len(extra) == 8 and {q.kind for q in extra} <= set(KINDS) - {"multi_image"}
        for q in extra:
            assert all(im is image for im in q.images)  # one encoded image serves all
            _check_against_pixels(q)
    kinds = Counter(q.kind for i in range(30)
                    for q in questions_about(rng, make_question(4, i, "colour").scenes[0],
                                             make_question(4, i, "colour").images[0], 4))
    assert set(kinds) == set(KINDS) - {"multi_image"}


def _check_against_pixels(q) -> None:
    scenes = [parse(im) for im in q.images]
    if q.kind == "multi_image":
        text = _text_parts(q.messages[0])
        assert text.startswith(f"Image-1: {IMAGE_TOKEN}\nImage-2: {IMAGE_TOKEN}\n")
        n1, n2 = len(scenes[0]), len(scenes[1])
        assert n1 != n2
        more = "more" in text
        assert q.answer == ("Image-1" if (n1 > n2) == more else "Image-2")
        return
    blobs = scenes[0]
    assert 1 <= len(blobs) <= 4
    user_turns = [m for m in q.messages if m["role"] == "user"]
    if q.kind == "multi_turn":
        first, follow = _text_parts(user_turns[0]), user_turns[1]["content"]
        assert isinstance(follow, str) and IMAGE_TOKEN not in follow  # no image in turn 2
        first_answer = q.messages[1]["content"]
        expected = _expected_single(first, blobs)
        if expected is None:
            _check_description(first_answer, blobs)
        else:
            assert first_answer == expected
        assert q.answer == _expected_single(follow, blobs)
        return
    text = _text_parts(user_turns[0])
    expected = _expected_single(text, blobs)
    if expected is None:
        assert q.kind == "describe"
        _check_description(q.answer, blobs)
    else:
        assert q.answer == expected


def test_single_image_questions_put_the_image_first():
    for q in generate_questions(9, 12):
        parts = q.messages[0]["content"]
        assert parts[-1]["type"] == "text" and all(p["type"] == "image" for p in parts[:-1])
        assert len(q.images) == (2 if q.kind == "multi_image" else 1)


def test_as_prompt_and_openai_messages():
    q = make_question(4, 0, "colour")
    text, image = q.as_prompt()
    assert text.startswith("What colo") and image is q.images[0]
    text, images = make_question(4, 0, "multi_image").as_prompt()
    assert text.count(IMAGE_TOKEN) == 2 and len(images) == 2
    with pytest.raises(ValueError):
        make_question(4, 0, "multi_turn").as_prompt()
    converted = to_openai_messages(q.messages)
    url = converted[0]["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")


def test_unknown_kind_is_an_error():
    with pytest.raises(ValueError, match="unknown question kind"):
        make_question(0, 0, "riddle")


@pytest.mark.parametrize("pred,answer,ok", [
    ("two red circles", "two red circles", True),
    ("  Two  Red circles. ", "two red circles", True),
    ("Image-1.", "Image-1", True),
    ("two red circles and", "two red circles", False),
    ("2", "two", False),
    ("left side", "left", False),
])
def test_exact_match_normalises_only_case_space_and_period(pred, answer, ok):
    assert exact_match(pred, answer) is ok


def test_evaluate_counts_per_kind():
    qs = generate_questions(2, 12)
    report = evaluate(lambda messages: next(q.answer for q in qs if q.messages is messages), qs)
    assert report.n == 12 and report.accuracy() == 1.0
    wrong = evaluate(lambda messages: "no", qs)
    assert wrong.n_correct == 0 and len(wrong.failures) == 12
    assert set(wrong.total) == set(KINDS) and isinstance(wrong, EvalReport)


@pytest.mark.parametrize("n,p,alpha", [(24, 0.95, 1e-3), (40, 0.9, 0.01), (300, 0.95, 1e-3)])
def test_min_correct_is_the_binomial_quantile(n, p, alpha):
    k = min_correct(n, p, alpha)

    def below(j: int) -> float:  # P(X < j)
        return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(j))

    assert below(k) <= alpha < below(k + 1)
