"""The training question stream: which questions training sample ``i`` asks, and in which form.

Contract: every function here is a pure function of its arguments and of ``KIND_WEIGHTS``; the
randomness comes from ``random.Random`` seeded with strings such as ``f"kind/{TRAIN_SEED}/{i}"``,
never from a shared generator. So sample ``i`` is the same whichever worker draws it and in
whatever order, and a later training stage reads fresh questions by starting at another index
(``--data-offset``). ``KIND_WEIGHTS`` is the one mutable input: the command line updates it in
place once (``--kind-weights``), before any data-loader worker forks, and never after.

An option added later draws from a seed string of its own (``absent/...``) or after the existing
draws (``prompt_form``), so runs that leave it off keep exactly the questions they had.
"""

from __future__ import annotations

import random

from vlmdeploy.synthetic.questions import (
    COUNT_PROMPTS,
    FEWER_PROMPT,
    MORE_PROMPT,
    MULTI_IMAGE_PREFIX,
    Message,
    Question,
    make_question,
    questions_about,
)
from vlmdeploy.synthetic.scene import SHAPES

TRAIN_SEED = 0  # question stream used for training and for the tokenizer corpus
# Training mix: descriptions and the two-image/two-turn forms are the hardest, so they get more.
KIND_WEIGHTS = {"describe": 0.22, "count": 0.14, "colour": 0.1, "position": 0.14,
                "multi_image": 0.2, "multi_turn": 0.2}

# Share of training prompts in the other forms users send: a single image after the text
# (OpenAI-style [text, image] parts) and two images without "Image-i:" labels.
TEXT_FIRST_SHARE = 0.15
UNLABELLED_SHARE = 0.2


def parse_kind_weights(text: str) -> dict[str, float]:
    """``'multi_turn=0.3,count=0.2'`` -> weights for those kinds (relative, like KIND_WEIGHTS)."""
    out = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, _, value = item.partition("=")
        if kind not in KIND_WEIGHTS:
            raise ValueError(f"--kind-weights: unknown kind {kind!r}")
        out[kind] = float(value)
        if out[kind] < 0:
            raise ValueError(f"--kind-weights: {kind} must be >= 0")
    return out


def kind_of(index: int) -> str:
    rng = random.Random(f"kind/{TRAIN_SEED}/{index}")
    return rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()))[0]


def prompt_form(index: int | str, kind: str, messages: list[Message], plain_share: float = 0.0
                ) -> list[Message]:
    """Question ``index`` in the prompt form it trains: mostly canonical, sometimes another form."""
    rng = random.Random(f"form/{TRAIN_SEED}/{index}")
    first, *rest = messages
    parts = first["content"]
    if kind == "multi_image" and rng.random() < UNLABELLED_SHARE:
        text = parts[-1]["text"].replace(MULTI_IMAGE_PREFIX, "")
        first = {"role": "user", "content": [*parts[:-1], {"type": "text", "text": text}]}
    elif kind != "multi_image" and rng.random() < TEXT_FIRST_SHARE:
        first = {"role": "user", "content": [parts[-1], *parts[:-1]]}
    out = [first, *rest]
    if rng.random() < plain_share:  # drawn last, so plain_share=0 leaves earlier draws unchanged
        out = [_plain(m) if m["role"] == "user" else m for m in out]
    return out


def _plain(message: Message) -> Message:
    """The message as typed in a terminal: lower case, no final period ("describe this image")."""
    def plain(text: str) -> str:
        head, sep, question = text.rpartition("\n")
        return head + sep + question.lower().rstrip(".")

    content = message["content"]
    if isinstance(content, str):
        return {"role": "user", "content": plain(content)}
    return {"role": "user", "content": [
        {"type": "text", "text": plain(p["text"])} if p["type"] == "text" else p
        for p in content]}


def sample_questions(index: int, per_scene: int, absent_share: float = 0.0) -> list[Question]:
    """Training sample ``index``: question ``index`` of the stream and, with ``per_scene > 1``,
    more questions about the same image(s), so one vision pass trains several answers. A
    two-image question gets its mirror ("more" <-> "fewer"); a single-image one gets
    ``per_scene - 1`` questions of random kinds about its scene. With ``absent_share``, that share
    of the single-image count questions asks about a shape the scene lacks (answer ``0``)."""
    questions = _sample_questions(index, per_scene)
    if absent_share > 0:
        rng = random.Random(f"absent/{TRAIN_SEED}/{index}")
        questions = [ask_absent(q, rng) if q.kind == "count" and rng.random() < absent_share
                     else q for q in questions]
    return questions


def ask_absent(q: Question, rng: random.Random) -> Question:
    """The count question ``q`` asked instead about a shape its scene does not hold (``q`` itself
    when the scene holds every shape)."""
    absent = [s for s in SHAPES if q.scenes[0].count(s) == 0]
    if not absent:
        return q
    content = q.messages[0]["content"]
    text = rng.choice(COUNT_PROMPTS).format(rng.choice(absent))
    messages = [{"role": "user", "content": [*content[:-1], {"type": "text", "text": text}]}]
    return Question(q.kind, messages, "0", q.scenes)


def _sample_questions(index: int, per_scene: int) -> list[Question]:
    q = make_question(TRAIN_SEED, index, kind_of(index))
    if per_scene <= 1:
        return [q]
    if q.kind == "multi_image":
        text = q.messages[0]["content"][-1]["text"]
        flipped = (text.replace(MORE_PROMPT, FEWER_PROMPT) if MORE_PROMPT in text
                   else text.replace(FEWER_PROMPT, MORE_PROMPT))
        parts = [*q.messages[0]["content"][:-1], {"type": "text", "text": flipped}]
        answer = "Image-2" if q.answer == "Image-1" else "Image-1"
        return [q, Question(q.kind, [{"role": "user", "content": parts}], answer, q.scenes)]
    rng = random.Random(f"more/{TRAIN_SEED}/{index}")
    return [q, *questions_about(rng, q.scenes[0], q.images[0], per_scene - 1)]
