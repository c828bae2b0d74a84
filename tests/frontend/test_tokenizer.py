"""``Tokenizer``: special ids come from the tokenizer files, never from constants; and
``IncrementalDetokenizer``: streamed deltas add up to the full decode."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as RawTokenizer

from vlmdeploy.frontend.chat_template import ChatTemplate
from vlmdeploy.frontend.output import IncrementalDetokenizer
from vlmdeploy.frontend.prompt import tokenize_with_images
from vlmdeploy.frontend.tokenizer import Tokenizer
from vlmdeploy.vl.constants import IMAGE_TOKEN

# Special tokens deliberately at ids unlike Qwen3's, in a shuffled order.
SPECIALS = {
    "<IMG_CONTEXT>": 256,
    "</img>": 257,
    "<img>": 258,
    "<|im_end|>": 259,
    "<|im_start|>": 260,
    "<|endoftext|>": 261,
}


def write_small_tokenizer(
    root: Path,
    specials: dict[str, int] = SPECIALS,
    generation_eos: list[int] | None = None,
    template: str | None = None,
) -> Path:
    """A byte-level BPE with no merges (ids 0..255 are the bytes) and ``specials`` after it."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = RawTokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    for content, want in sorted(specials.items(), key=lambda kv: kv[1]):
        tok.add_special_tokens([AddedToken(content, special=True, normalized=False)])
        assert tok.token_to_id(content) == want
    root.mkdir(parents=True, exist_ok=True)
    tok.save(str(root / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False,
    }
    if template is not None:
        config["chat_template"] = template
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    if generation_eos is not None:
        (root / "generation_config.json").write_text(json.dumps({"eos_token_id": generation_eos}))
    return root


def test_special_ids_are_resolved_through_the_tokenizer(tmp_path: Path):
    tok = Tokenizer(write_small_tokenizer(tmp_path, generation_eos=[259, 261]))
    assert tok.image_ids == {"img_start": 258, "img_end": 257, "img_context": 256}
    assert tok.eos_token_id == 259
    assert tok.stop_ids == {259, 261}
    assert tok.vocab_size == 262
    assert tok.chat_template is None


def test_stop_ids_without_generation_config(tmp_path: Path):
    tok = Tokenizer(write_small_tokenizer(tmp_path))
    assert tok.stop_ids == {259}


def test_generation_config_single_eos_int(tmp_path: Path):
    root = write_small_tokenizer(tmp_path)
    (root / "generation_config.json").write_text(json.dumps({"eos_token_id": 261}))
    assert Tokenizer(root).stop_ids == {259, 261}


def test_image_blocks_use_the_tokenizers_ids(tmp_path: Path):
    tok = Tokenizer(write_small_tokenizer(tmp_path))
    text = ChatTemplate(tok.chat_template).render(
        [{"role": "user", "content": f"{IMAGE_TOKEN}\nhi {IMAGE_TOKEN}"}]
    )
    ids = tokenize_with_images(text, [3, 2], tok.encode, tok.image_ids)
    expanded = text.replace(IMAGE_TOKEN, "<img>" + "<IMG_CONTEXT>" * 3 + "</img>", 1)
    expanded = expanded.replace(IMAGE_TOKEN, "<img>" + "<IMG_CONTEXT>" * 2 + "</img>", 1)
    assert ids == tok.hf.encode(expanded, add_special_tokens=False)
    assert ids.count(256) == 5 and ids.count(258) == 2 and ids.count(257) == 2
    assert ids[0] == 260 and 259 in ids  # ChatML fallback, with this tokenizer's ids
    assert not any(i >= 262 for i in ids)


def test_tokenizer_without_image_tokens_is_refused(tmp_path: Path):
    specials = {"<|im_end|>": 256, "<|im_start|>": 257, "<|endoftext|>": 258}
    with pytest.raises(ValueError, match="<img>|IMG_CONTEXT"):
        Tokenizer(write_small_tokenizer(tmp_path, specials))


def test_real_ids_of_the_tiny_checkpoint(tiny_ckpts):
    # DESIGN §3's ids, as the synthetic Qwen3 tokenizer places them.
    tok = Tokenizer(tiny_ckpts["hf"])
    assert tok.image_ids == {"img_start": 151669, "img_end": 151670, "img_context": 151671}
    assert tok.eos_token_id == 151645 and tok.stop_ids == {151643, 151645}


# ---- incremental detokenization


@pytest.fixture(params=["native", "windowed"])
def path(request) -> str:
    """Both detokenizer paths: the tokenizers library's DecodeStream and windowed decodes."""
    return request.param


def stream(tok: Tokenizer, ids: list[int], skip: bool, path: str = "native"
           ) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tok, skip)
    assert detok._stream is not None  # the fast tokenizer has a native stream
    if path == "windowed":
        detok._stream = None
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    return deltas, detok.text


MULTIBYTE = "héllo wörld 中文字符 🤖🎉 naïve café — ok\n日本語 ẞ Ω"


def random_ids(rng: random.Random, pool: list[int], n: int) -> list[int]:
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.5:
            out.append(rng.choice(pool))  # pieces of multi-byte characters
        elif r < 0.6:
            out.append(rng.randint(151643, 151935))  # added / special tokens
        elif r < 0.8:
            out.append(rng.randint(0, 255))  # single bytes, often invalid UTF-8 alone
        else:
            out.append(rng.randint(0, 151642))
    return out


@pytest.mark.parametrize("skip", [True, False])
def test_deltas_add_up_to_the_full_decode(tiny_ckpts, path, skip: bool):
    tok = Tokenizer(tiny_ckpts["hf"])
    pool = tok.encode(MULTIBYTE)
    rng = random.Random(1234 + skip)
    for _ in range(150):
        ids = random_ids(rng, pool, rng.randint(1, 40))
        deltas, text = stream(tok, ids, skip, path)
        assert "".join(deltas) == text == tok.decode(ids, skip), ids


def test_split_characters_are_emitted_whole(tiny_ckpts, path):
    tok = Tokenizer(tiny_ckpts["hf"])
    ids = tok.encode("中🤖")
    assert len(ids) > 2  # the synthetic BPE knows no CJK or emoji: they arrive byte by byte
    deltas, text = stream(tok, ids, True, path)
    assert text == "中🤖"
    assert all("\ufffd" not in d for d in deltas)
    assert [d for d in deltas if d] == ["中", "🤖"]


def test_plain_text_streams_token_by_token(tiny_ckpts, path):
    tok = Tokenizer(tiny_ckpts["hf"])
    ids = tok.encode("the cat sat on the mat")
    deltas, _ = stream(tok, ids, True, path)
    assert deltas[:-1] == [tok.decode([i]) for i in ids]  # nothing held back for ASCII


def test_skip_special_tokens(tiny_ckpts, path):
    tok = Tokenizer(tiny_ckpts["hf"])
    ids = [*tok.encode("Answer"), 151645, 151667, *tok.encode(" done"), 151643]
    skipped = "".join(stream(tok, ids, True, path)[0])
    kept = "".join(stream(tok, ids, False, path)[0])
    assert skipped == "Answer<think> done"  # <think> is not a special token in Qwen3
    assert kept == "Answer<|im_end|><think> done<|endoftext|>"


def test_flush_releases_a_trailing_incomplete_character(tiny_ckpts, path):
    tok = Tokenizer(tiny_ckpts["hf"])
    ids = tok.encode("ok 中")[:-1]  # drop the last byte of 中
    deltas, text = stream(tok, ids, True, path)
    assert "".join(deltas[:-1]) == "ok "  # held back while incomplete
    assert text == tok.decode(ids) and text.endswith("\ufffd")
