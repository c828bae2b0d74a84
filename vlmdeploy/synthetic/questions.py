"""Question/answer pairs over synthetic scenes, with short exact answers from a closed vocabulary.

``make_question(seed, index, kind)`` is a pure function: the same arguments always give the same
images, conversation and answer (the generator is seeded with a string, which Python hashes with
SHA-512, so ``PYTHONHASHSEED`` does not matter). ``generate_questions(seed, n)`` cycles through the
kinds so every kind gets ``n / len(kinds)`` questions.

Conversations are OpenAI-style message lists whose image parts hold PIL images
(``{"type": "image", "image": <PIL.Image>}``); ``to_openai_messages`` turns them into ``image_url``
parts with PNG data URLs for HTTP clients. Kinds and their answers:

- ``describe``:    "Describe the image."             -> "two red circles and a blue square"
- ``count``:       "How many stars are there?"       -> "0" .. "4"
- ``colour``:      "What colour is the triangle?"    -> "red" | "green" | "blue" | "yellow"
- ``position``:    "Where is the circle?"     -> "left" | "right" | "top" | "bottom" | "center"
- ``multi_image``: "Image-1: {IMAGE_TOKEN}\\nImage-2: {IMAGE_TOKEN}\\nWhich image has more shapes?"
                   -> "Image-1" | "Image-2" (the placeholders put each image after its label)
- ``multi_turn``:  a first question about an image (with its true answer as the assistant turn),
                   then a text-only follow-up (position or colour) that needs that image again.
"""

from __future__ import annotations

import base64
import io
import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from PIL import Image

from vlmdeploy.synthetic.scene import COLOURS, SHAPES, Scene, render, sample_scene
from vlmdeploy.vl.constants import IMAGE_TOKEN

KINDS = ("describe", "count", "colour", "position", "multi_image", "multi_turn")

COUNT_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}

DESCRIBE_PROMPTS = ("Describe the image.", "Describe this image.", "What is in the image?")
COUNT_PROMPTS = ("How many {}s are there?", "How many {}s are in the image?")
TOTAL_PROMPT = "How many shapes are there?"
COLOUR_PROMPTS = ("What colour is the {}?", "What color is the {}?")
POSITION_PROMPT = "Where is the {}?"
MORE_PROMPT = "Which image has more shapes?"
FEWER_PROMPT = "Which image has fewer shapes?"
# Multi-image questions place their images explicitly, in InternVL's labelled style.
MULTI_IMAGE_PREFIX = f"Image-1: {IMAGE_TOKEN}\nImage-2: {IMAGE_TOKEN}\n"

Message = dict[str, Any]


@dataclass(frozen=True)
class Question:
    """One evaluation item: the conversation to answer and the expected final answer."""

    kind: str
    messages: list[Message]
    answer: str
    scenes: tuple[Scene, ...]

    @property
    def images(self) -> list[Image.Image]:
        return [p["image"] for m in self.messages if isinstance(m["content"], list)
                for p in m["content"] if p["type"] == "image"]

    def as_prompt(self) -> tuple[str, Image.Image | list[Image.Image]]:
        """The ``(text, image)`` / ``(text, [images])`` form of a single-turn question (multi-image
        text keeps its ``IMAGE_TOKEN`` placeholders)."""
        if len(self.messages) != 1:
            raise ValueError("only single-turn questions have a (text, images) form")
        text = "".join(p["text"] for p in self.messages[0]["content"] if p["type"] == "text")
        images = self.images
        return text, images[0] if len(images) == 1 else images


def describe(scene: Scene) -> str:
    """Canonical description: groups of equal (colour, shape), in SHAPES then COLOURS order."""
    groups = Counter((o.shape, o.colour) for o in scene.objects)
    order = sorted(groups, key=lambda g: (SHAPES.index(g[0]), COLOURS.index(g[1])))
    phrases = []
    for shape, colour in order:
        n = groups[(shape, colour)]
        phrases.append(f"{COUNT_WORDS[n]} {colour} {shape}{'s' if n > 1 else ''}")
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def normalize_answer(text: str) -> str:
    """Lower case, single spaces, no surrounding space and no trailing periods."""
    return re.sub(r"\s+", " ", text).strip().rstrip(".").strip().lower()


def exact_match(pred: str, answer: str) -> bool:
    return normalize_answer(pred) == normalize_answer(answer)


def _user(images: list[Image.Image], text: str) -> Message:
    parts: list[dict[str, Any]] = [{"type": "image", "image": im} for im in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def _scene_with_unique_shape(rng: random.Random) -> tuple[Scene, str]:
    """A scene and a shape that occurs in it exactly once (redraws until there is one)."""
    while True:
        scene = sample_scene(rng)
        unique = [s for s in SHAPES if scene.count(s) == 1]
        if unique:
            return scene, rng.choice(unique)


def _count_qa(rng: random.Random, scene: Scene) -> tuple[str, str]:
    if rng.random() < 0.25:
        return TOTAL_PROMPT, str(scene.count())
    present = [s for s in SHAPES if scene.count(s)]
    # Mostly ask about a shape that is there; sometimes about one that is not ("0").
    shape = rng.choice(present) if rng.random() < 0.8 else rng.choice(SHAPES)
    return rng.choice(COUNT_PROMPTS).format(shape), str(scene.count(shape))


def _colour_qa(rng: random.Random, scene: Scene, shape: str) -> tuple[str, str]:
    return rng.choice(COLOUR_PROMPTS).format(shape), scene.only(shape).colour


def _position_qa(scene: Scene, shape: str) -> tuple[str, str]:
    return POSITION_PROMPT.format(shape), scene.only(shape).slot


def _ask(kind: str, rng: random.Random, scene: Scene, image: Image.Image,
         shape: str | None = None) -> Question:
    """A question of ``kind`` about ``scene`` (drawn as ``image``). ``colour``, ``position`` and
    ``multi_turn`` need ``shape``: a shape that occurs in the scene exactly once."""
    if kind == "describe":
        text, answer = rng.choice(DESCRIBE_PROMPTS), describe(scene)
    elif kind == "count":
        text, answer = _count_qa(rng, scene)
    elif kind == "colour":
        text, answer = _colour_qa(rng, scene, shape)
    elif kind == "position":
        text, answer = _position_qa(scene, shape)
    else:
        return _multi_turn(rng, scene, image, shape)
    return Question(kind, [_user([image], text)], answer, (scene,))


def _multi_image(rng: random.Random) -> Question:
    n1, n2 = rng.sample(range(1, 5), 2)  # distinct totals, so exactly one image has more
    scenes = (sample_scene(rng, n_objects=n1), sample_scene(rng, n_objects=n2))
    more = rng.random() < 0.5
    text = MULTI_IMAGE_PREFIX + (MORE_PROMPT if more else FEWER_PROMPT)
    first_wins = (n1 > n2) == more
    answer = "Image-1" if first_wins else "Image-2"
    return Question("multi_image", [_user([render(s) for s in scenes], text)], answer, scenes)


def _multi_turn(rng: random.Random, scene: Scene, image: Image.Image, shape: str) -> Question:
    if rng.random() < 0.5:
        first, first_answer = rng.choice(DESCRIBE_PROMPTS), describe(scene)
        # The description already names the colours, so only the position needs the image.
        follow, answer = _position_qa(scene, shape)
    else:
        first, first_answer = _count_qa(rng, scene)
        use_colour = rng.random() < 0.5
        follow, answer = _colour_qa(rng, scene, shape) if use_colour else _position_qa(scene, shape)
    messages = [
        _user([image], first),
        {"role": "assistant", "content": first_answer},
        {"role": "user", "content": follow},
    ]
    return Question("multi_turn", messages, answer, (scene,))


NEEDS_UNIQUE_SHAPE = ("colour", "position", "multi_turn")


def questions_about(rng: random.Random, scene: Scene, image: Image.Image, n: int) -> list[Question]:
    """``n`` single-image questions (any kind but ``multi_image``) about one scene, all showing
    the same ``image`` object: training reads several questions per encoded image."""
    unique = [s for s in SHAPES if scene.count(s) == 1]
    kinds = [k for k in KINDS if k != "multi_image" and (unique or k not in NEEDS_UNIQUE_SHAPE)]
    out = []
    for _ in range(n):
        kind = rng.choice(kinds)
        shape = rng.choice(unique) if kind in NEEDS_UNIQUE_SHAPE else None
        out.append(_ask(kind, rng, scene, image, shape))
    return out


def make_question(seed: int, index: int, kind: str) -> Question:
    """Question ``index`` of kind ``kind`` in the stream of ``seed`` (pure function)."""
    rng = random.Random(f"shapes/{seed}/{index}/{kind}")
    if kind == "multi_image":
        return _multi_image(rng)
    if kind not in KINDS:
        raise ValueError(f"unknown question kind {kind!r}; known: {', '.join(KINDS)}")
    shape = None
    if kind in NEEDS_UNIQUE_SHAPE:
        scene, shape = _scene_with_unique_shape(rng)
    else:
        scene = sample_scene(rng)
    return _ask(kind, rng, scene, render(scene), shape)


def generate_questions(seed: int, n: int, kinds: tuple[str, ...] = KINDS) -> list[Question]:
    """``n`` questions of seed ``seed``, cycling through ``kinds`` in order."""
    return [make_question(seed, i, kinds[i % len(kinds)]) for i in range(n)]


def image_data_url(image: Image.Image) -> str:
    """Lossless PNG data URL of ``image`` (what an HTTP client would send)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def to_openai_messages(messages: list[Message]) -> list[Message]:
    """The same conversation with image parts as OpenAI ``image_url`` parts (PNG data URLs)."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [
                {"type": "image_url", "image_url": {"url": image_data_url(p["image"])}}
                if p["type"] == "image" else p
                for p in content
            ]
        out.append({"role": m["role"], "content": content})
    return out
