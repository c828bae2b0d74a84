"""Prompt forms → messages → chat template → token ids with image blocks
(``vlmdeploy.frontend.prompt``)."""

from __future__ import annotations

import pytest
from PIL import Image

from vlmdeploy.errors import InvalidRequestError
from vlmdeploy.frontend.chat_template import THINKING_SYSTEM_PROMPT, ChatTemplate
from vlmdeploy.frontend.prompt import build_conversation, to_messages, tokenize_with_images
from vlmdeploy.frontend.tokenizer import Tokenizer
from vlmdeploy.vl.constants import IMAGE_TOKEN

IMG_A = Image.new("RGB", (8, 8), (255, 0, 0))
IMG_B = Image.new("RGB", (8, 8), (0, 255, 0))


def image_sources(conv) -> list:
    return [ref.source for ref in conv.images]


# ---- prompt forms


def test_str_prompt():
    assert to_messages("hi") == [{"role": "user", "content": "hi"}]


def test_text_image_tuple_puts_the_image_before_the_text():
    (msg,) = to_messages(("describe", IMG_A))
    assert msg["role"] == "user"
    assert [p["type"] for p in msg["content"]] == ["image", "text"]
    assert msg["content"][0]["image"] is IMG_A and msg["content"][1]["text"] == "describe"
    conv = build_conversation([msg])
    assert conv.messages == [{"role": "user", "content": f"{IMAGE_TOKEN}\ndescribe"}]
    assert image_sources(conv) == [IMG_A]


def test_text_images_tuple_keeps_image_order():
    conv = build_conversation(to_messages(("compare", [IMG_A, IMG_B, "https://x/c.png"])))
    assert conv.messages[0]["content"] == f"{IMAGE_TOKEN}\n{IMAGE_TOKEN}\n{IMAGE_TOKEN}\ncompare"
    assert image_sources(conv) == [IMG_A, IMG_B, "https://x/c.png"]


@pytest.mark.parametrize(
    "prompt",
    [
        (IMG_A, "describe"),
        ("https://x/a.png", "describe"),
        ("data:image/png;base64,AAAA", "describe"),
    ],
    ids=["pil-first", "url-first", "data-url-first"],
)
def test_image_text_tuple_is_accepted_in_either_order(prompt):
    image, text = prompt
    assert to_messages(prompt) == to_messages((text, image))


def test_message_list_is_taken_as_is():
    msgs = [{"role": "user", "content": [{"type": "text", "text": "x"}]}]
    assert to_messages(msgs) == msgs


@pytest.mark.parametrize(
    "prompt",
    [
        42,
        None,
        [],
        ["a", "b"],
        (1, 2),
        ("a", "b", "c"),
        ("a",),
        {"role": "user", "content": "x"},
        (IMG_A, IMG_B),
        b"bytes",
    ],
    ids=[
        "int",
        "none",
        "empty-list",
        "list-of-str",
        "int-tuple",
        "3-tuple",
        "1-tuple",
        "dict",
        "two-images",
        "bytes",
    ],
)
def test_unknown_prompt_forms_are_refused(prompt):
    with pytest.raises(InvalidRequestError) as err:
        to_messages(prompt)
    assert err.value.code == "invalid_prompt" and err.value.param == "prompts"


# ---- image placement


def test_image_parts_are_placed_where_they_stand():
    content = [
        {"type": "text", "text": "First "},
        {"type": "image_url", "image_url": {"url": "https://x/1.png"}},
        {"type": "text", "text": "then "},
        {"type": "image", "image": IMG_B},
        {"type": "text", "text": "end"},
    ]
    conv = build_conversation([{"role": "user", "content": content}])
    assert conv.messages[0]["content"] == f"First {IMAGE_TOKEN}\nthen {IMAGE_TOKEN}\nend"
    assert image_sources(conv) == ["https://x/1.png", IMG_B]


def test_image_token_places_images_explicitly():
    text = f"Image-1: {IMAGE_TOKEN}\nImage-2: {IMAGE_TOKEN}\nWhat differs?"
    conv = build_conversation(to_messages((text, [IMG_A, IMG_B])))
    assert conv.messages[0]["content"] == text  # no extra placeholders for the image parts
    assert image_sources(conv) == [IMG_A, IMG_B]


def test_image_token_in_a_message_list():
    content = [
        {"type": "text", "text": f"A: {IMAGE_TOKEN} B: {IMAGE_TOKEN}"},
        {"type": "image_url", "image_url": "https://x/a.png"},
        {"type": "image_url", "image_url": {"url": "https://x/b.png"}},
    ]
    conv = build_conversation([{"role": "user", "content": content}])
    assert conv.messages[0]["content"] == f"A: {IMAGE_TOKEN} B: {IMAGE_TOKEN}"
    assert image_sources(conv) == ["https://x/a.png", "https://x/b.png"]


@pytest.mark.parametrize(
    "text,images",
    [
        (f"{IMAGE_TOKEN} and {IMAGE_TOKEN}", [IMG_A]),
        (f"only {IMAGE_TOKEN}", [IMG_A, IMG_B]),
        (f"{IMAGE_TOKEN} without any image", None),
    ],
    ids=["more-placeholders", "more-images", "no-images"],
)
def test_placeholder_image_count_mismatch(text, images):
    prompt = text if images is None else (text, images)
    with pytest.raises(InvalidRequestError) as err:
        build_conversation(to_messages(prompt))
    assert err.value.code == "image_count_mismatch"


def test_system_message_and_multi_turn_history():
    msgs = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "image", "image": IMG_A}, {"type": "text", "text": "What is it?"}],
        },
        {"role": "assistant", "content": "A red square."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "And this?"}, {"type": "image", "image": IMG_B}],
        },
    ]
    conv = build_conversation(msgs)
    assert conv.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": f"{IMAGE_TOKEN}\nWhat is it?"},
        {"role": "assistant", "content": "A red square."},
        {"role": "user", "content": f"And this?{IMAGE_TOKEN}\n"},
    ]
    assert image_sources(conv) == [IMG_A, IMG_B]


def test_unknown_part_type():
    content = [{"type": "text", "text": "x"}, {"type": "input_audio", "input_audio": {}}]
    with pytest.raises(InvalidRequestError) as err:
        build_conversation([{"role": "user", "content": content}])
    assert err.value.code == "unsupported_content_type"
    assert err.value.param == "messages[0].content[1].type"


@pytest.mark.parametrize(
    "msg",
    [
        {"role": "hacker", "content": "x"},
        {"content": "x"},
        {"role": "function", "content": "x"},  # OpenAI's old role; "tool" is supported
        {"role": None, "content": "x"},
        "not a dict",
    ],
    ids=["hacker", "missing", "function", "none", "str"],
)
def test_bad_roles(msg):
    with pytest.raises(InvalidRequestError) as err:
        build_conversation([{"role": "user", "content": "ok"}, msg])
    assert err.value.code == "invalid_role" and err.value.param == "messages[1].role"


@pytest.mark.parametrize("content", [None, 5, {"type": "text", "text": "x"}])
def test_bad_content(content):
    with pytest.raises(InvalidRequestError) as err:
        build_conversation([{"role": "user", "content": content}])
    assert err.value.param == "messages[0].content"


def test_empty_message_list():
    with pytest.raises(InvalidRequestError) as err:
        build_conversation([])
    assert err.value.code == "empty_array"


def test_per_image_tile_limits():
    content = [
        {"type": "image_url", "image_url": {"url": "u1", "detail": "low"}},
        {"type": "image_url", "image_url": {"url": "u2", "detail": "high"}},
        {"type": "image_url", "image_url": {"url": "u3", "detail": "auto"}},
        {"type": "image_url", "image_url": {"url": "u4", "max_dynamic_patch": 3, "detail": "high"}},
        {"type": "image", "image": IMG_A, "max_dynamic_patch": 2},
        {"type": "image_url", "image_url": "u6"},
    ]
    conv = build_conversation([{"role": "user", "content": content}])
    # detail low/high → 6/24 (LMDeploy); auto and absent → the checkpoint's own limit (None)
    assert [ref.max_dynamic_patch for ref in conv.images] == [6, 24, None, 3, 2, None]


@pytest.mark.parametrize("value", [0, -1, "12", 2.5, True, 10**6])
def test_bad_tile_limit(value):
    part = {"type": "image_url", "image_url": {"url": "u", "max_dynamic_patch": value}}
    with pytest.raises(InvalidRequestError) as err:
        build_conversation([{"role": "user", "content": [part]}])
    assert err.value.param == "messages[0].content[0].image_url.max_dynamic_patch"


def test_bad_image_url_part():
    part = {"type": "image_url", "image_url": {"href": "u"}}
    with pytest.raises(InvalidRequestError) as err:
        build_conversation([{"role": "user", "content": [part]}])
    assert err.value.code == "invalid_image_url"


# ---- chat template


MULTI_TURN = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": f"{IMAGE_TOKEN}\nWhat colour?"},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "Sure? Ünïcödé 中文 {{ not jinja }}"},
]


@pytest.mark.parametrize("fmt", ["original", "hf"])
def test_checkpoint_template_matches_transformers(tiny_ckpts, fmt):
    tok = Tokenizer(tiny_ckpts[fmt])
    assert tok.chat_template  # the tiny checkpoints ship one
    ours = ChatTemplate(tok.chat_template, tok.hf.special_tokens_map)
    for msgs in (MULTI_TURN, MULTI_TURN[1:2], MULTI_TURN[:3]):
        want = tok.hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert ours.render(msgs) == want


# Templates using what real checkpoints' templates use: namespace, loop controls, tojson,
# special-token variables, an `enable_thinking is defined` test (Qwen3 style), raise_exception.
TEMPLATES = {
    "namespace-break": (
        "{%- set ns = namespace(last_user=-1) -%}"
        "{%- for m in messages -%}{%- if m.role == 'user' %}{% set ns.last_user = loop.index0 %}"
        "{%- endif -%}{%- endfor -%}"
        "{%- for m in messages -%}{%- if loop.index0 > ns.last_user %}{% break %}{% endif -%}"
        "<|im_start|>{{ m.role }}\n{{ m.content | trim }}<|im_end|>\n{%- endfor %}\n"
        "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "tojson-eos": (
        "{{ messages | tojson }}|{{ eos_token }}|{{ pad_token }}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "thinking-defined": (
        "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
        "{%- endfor %}<|im_start|>assistant\n"
        "{%- if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
        "{%- endif %}"
    ),
}


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_template_features_match_transformers(tiny_ckpts, name):
    tok = Tokenizer(tiny_ckpts["hf"])
    template = TEMPLATES[name]
    ours = ChatTemplate(template, tok.hf.special_tokens_map)
    msgs = [*MULTI_TURN, {"role": "assistant", "content": "<tag> & 'quote'"}]
    want = tok.hf.apply_chat_template(
        msgs, chat_template=template, tokenize=False, add_generation_prompt=True
    )
    assert ours.render(msgs) == want
    for flag in (False, True):  # msgs has its own system message: no thinking prompt is added
        want = tok.hf.apply_chat_template(
            msgs,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=flag,
        )
        assert ours.render(msgs, enable_thinking=flag) == want


def test_template_raise_exception_is_a_request_error():
    tpl = ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(InvalidRequestError, match="roles must alternate"):
        tpl.render([{"role": "user", "content": "x"}])


def test_template_sandbox_blocks_python_internals():
    tpl = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(Exception) as err:
        tpl.render([{"role": "user", "content": "x"}])
    assert "unsafe" in str(err.value).lower() or "security" in type(err.value).__name__.lower()


def test_chatml_fallback_without_a_template():
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "V"},
    ]
    want = (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
        "<|im_start|>assistant\nA<|im_end|>\n<|im_start|>user\nV<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert ChatTemplate(None).render(msgs) == want
    assert (
        ChatTemplate(None).render(msgs, add_generation_prompt=False)
        == want[: -len("<|im_start|>assistant\n")]
    )


def test_thinking_system_prompt():
    user = [{"role": "user", "content": "2+2?"}]
    text = ChatTemplate(None).render(user, enable_thinking=True)
    assert text.startswith(f"<|im_start|>system\n{THINKING_SYSTEM_PROMPT}<|im_end|>\n")
    assert "<think>" in THINKING_SYSTEM_PROMPT and "</think>" in THINKING_SYSTEM_PROMPT
    assert (
        ChatTemplate(None).render(user)
        == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    # a system message of the caller's own is kept, not replaced
    own = [{"role": "system", "content": "Mine."}, *user]
    assert THINKING_SYSTEM_PROMPT not in ChatTemplate(None).render(own, enable_thinking=True)


# ---- tokenizing with image blocks


def expand(text: str, counts: list[int]) -> str:
    for n in counts:
        text = text.replace(IMAGE_TOKEN, "<img>" + "<IMG_CONTEXT>" * n + "</img>", 1)
    return text


PROMPTS = [
    (f"<|im_start|>user\n{IMAGE_TOKEN}\nDescribe.<|im_end|>\n<|im_start|>assistant\n", [256]),
    (f"Image-1: {IMAGE_TOKEN}\nImage-2: {IMAGE_TOKEN}\nsame?", [512, 256]),
    (f"abc{IMAGE_TOKEN}def {IMAGE_TOKEN} ghi", [3, 5]),
    (f"{IMAGE_TOKEN}{IMAGE_TOKEN}", [1, 2]),
    (f"  lead {IMAGE_TOKEN}\n\n  日本語 🤖 naïve{IMAGE_TOKEN}", [7, 1]),
    ("no images at all, it's fine", []),
]


@pytest.mark.parametrize("text,counts", PROMPTS)
def test_tokenize_with_images_equals_tokenizing_the_expanded_string(tiny_ckpts, text, counts):
    tok = Tokenizer(tiny_ckpts["hf"])
    got = tokenize_with_images(text, counts, tok.encode, tok.image_ids)
    assert got == tok.hf.encode(expand(text, counts), add_special_tokens=False)
    assert got.count(tok.image_ids["img_context"]) == sum(counts)
    assert got.count(tok.image_ids["img_start"]) == len(counts)


def test_rendered_conversation_tokenizes_like_transformers(tiny_ckpts):
    """The whole text path: our template + image blocks == transformers' template on the expanded
    contents, tokenized in one go."""
    tok = Tokenizer(tiny_ckpts["original"])
    conv = build_conversation(
        [
            {"role": "system", "content": "Look closely."},
            {
                "role": "user",
                "content": [{"type": "image", "image": IMG_A}, {"type": "text", "text": "Colour?"}],
            },
            {"role": "assistant", "content": "Red."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "And these?"},
                    {"type": "image", "image": IMG_B},
                    {"type": "image", "image": IMG_A},
                ],
            },
        ]
    )
    counts = [256, 768, 512]
    text = ChatTemplate(tok.chat_template).render(conv.messages)
    got = tokenize_with_images(text, counts, tok.encode, tok.image_ids)
    it = iter(counts)  # expand each message with the counts of its own images, in order
    expanded = []
    for m in conv.messages:
        k = m["content"].count(IMAGE_TOKEN)
        expanded.append({**m, "content": expand(m["content"], [next(it) for _ in range(k)])})
    want = tok.hf.apply_chat_template(expanded, tokenize=False, add_generation_prompt=True)
    assert got == tok.hf.encode(want, add_special_tokens=False)


def test_typed_image_context_token_is_refused(tiny_ckpts):
    # It would take embeddings meant for the real image block and break the engine's batch.
    tok = Tokenizer(tiny_ckpts["hf"])
    text = f"{IMAGE_TOKEN}\nwhat is <IMG_CONTEXT> here?"
    with pytest.raises(InvalidRequestError) as err:
        tokenize_with_images(text, [4], tok.encode, tok.image_ids)
    assert err.value.code == "invalid_prompt"


@pytest.mark.parametrize("typed", ["<img>", "</img>"])
def test_typed_image_delimiters_are_allowed(tiny_ckpts, typed):
    tok = Tokenizer(tiny_ckpts["hf"])
    ids = tokenize_with_images(f"What does the HTML tag {typed} do?", [], tok.encode, tok.image_ids)
    assert tok.image_ids["img_context"] not in ids


def test_placeholders_lost_by_the_template_are_an_error(tiny_ckpts):
    tok = Tokenizer(tiny_ckpts["hf"])
    with pytest.raises(InvalidRequestError) as err:
        tokenize_with_images("no placeholder left", [256], tok.encode, tok.image_ids)
    assert err.value.code == "image_count_mismatch"
