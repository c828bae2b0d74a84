"""The synthetic tokenizer: HF-loadable, real special ids, full id coverage, ChatML templates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmdeploy.testing.tokenizer import chat_template, write_tokenizer

TEXTS = [
    'The cat is sitting on the table.\nWhat color is the car?',
    'def f(x):\n    return x + 1  # comment\n\n\n',
    "It's 3.14159 -- isn't it?   Tabs\tand\r\nCRLF.",
    'Ünïcödé: 你好，世界 🙂 — done',
    '<|im_start|>user\n<img><IMG_CONTEXT></img>\nhi<|im_end|>\n<think>x</think>',
    '',
]
# Ids from the Qwen3 tokenizer plus InternVL's additions (DESIGN §3).
REAL_IDS = {'<|endoftext|>': 151643, '<|im_start|>': 151644, '<|im_end|>': 151645,
            '<think>': 151667, '</think>': 151668, '<img>': 151669, '</img>': 151670,
            '<IMG_CONTEXT>': 151671, '<quad>': 151672, '</quad>': 151673, '<ref>': 151674,
            '</ref>': 151675, '<box>': 151676, '</box>': 151677, '<tool_call>': 151657}


@pytest.fixture(scope='module')
def tok_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('tok')
    write_tokenizer(out, 'original')
    return out


@pytest.fixture(scope='module')
def hf_tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


@pytest.fixture(scope='module')
def raw_tok(tok_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tok_dir / 'tokenizer.json'))


@pytest.mark.parametrize('text', TEXTS)
def test_round_trip_and_loaders_agree(hf_tok, raw_tok, text):
    ids = raw_tok.encode(text).ids
    assert hf_tok.encode(text, add_special_tokens=False) == ids
    assert raw_tok.decode(ids, skip_special_tokens=False) == text
    assert hf_tok.decode(ids) == text


def test_special_tokens_sit_at_real_ids(hf_tok, raw_tok):
    for token, i in REAL_IDS.items():
        assert raw_tok.token_to_id(token) == i and hf_tok.convert_tokens_to_ids(token) == i
        assert raw_tok.encode(token).ids == [i]
    assert hf_tok.eos_token == '<|im_end|>' and hf_tok.eos_token_id == 151645
    assert hf_tok.pad_token_id == 151643 and hf_tok.bos_token is None
    ids = raw_tok.encode('<img><IMG_CONTEXT><IMG_CONTEXT></img>').ids
    assert ids == [151669, 151671, 151671, 151670]


def test_every_id_decodes(hf_tok, raw_tok):
    assert raw_tok.get_vocab_size() == 151936 and len(hf_tok) == 151936
    texts = raw_tok.decode_batch([[i] for i in range(151936)], skip_special_tokens=False)
    assert all(texts)
    assert texts[151671] == '<IMG_CONTEXT>' and texts[151935] != texts[151934]


def test_skip_special_tokens_keeps_text(hf_tok):
    ids = hf_tok.encode('<|im_start|>assistant\nA cat.<|im_end|>', add_special_tokens=False)
    assert hf_tok.decode(ids, skip_special_tokens=True) == 'assistant\nA cat.'


def test_english_tokenizes_into_words(raw_tok):
    enc = raw_tok.encode('The cat is sitting on the table. What color is the car?')
    assert enc.tokens[:4] == ['The', 'Ġcat', 'Ġis', 'Ġsitting']
    assert len(enc.ids) == 14
    merges = (raw_tok.to_str() and json.loads(raw_tok.to_str())['model']['merges'])
    assert 1000 <= len(merges) <= 20000


def test_files_stay_small(tok_dir):
    assert (tok_dir / 'tokenizer.json').stat().st_size < 5_000_000
    cfg = json.loads((tok_dir / 'tokenizer_config.json').read_text())
    assert cfg['eos_token'] == '<|im_end|>' and cfg['chat_template'] == chat_template('original')
    assert (tok_dir / 'chat_template.jinja').read_text() == chat_template('original')


def _render(fmt: str, messages: list[dict], add_generation_prompt: bool = True) -> str:
    import jinja2

    env = jinja2.Environment()
    return env.from_string(chat_template(fmt)).render(
        messages=messages, add_generation_prompt=add_generation_prompt)


def test_chat_template_is_chatml(hf_tok):
    messages = [{'role': 'system', 'content': 'Be brief.'},
                {'role': 'user', 'content': 'Hi'},
                {'role': 'assistant', 'content': 'Hello.'},
                {'role': 'user', 'content': 'Bye'}]
    expected = ('<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n'
                '<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n'
                '<|im_start|>assistant\n')
    assert hf_tok.apply_chat_template(messages, tokenize=False,
                                      add_generation_prompt=True) == expected
    assert _render('original', messages, add_generation_prompt=False) == expected[:-len(
        '<|im_start|>assistant\n')]


def test_no_default_system_prompt(hf_tok):
    out = hf_tok.apply_chat_template([{'role': 'user', 'content': 'Hi'}], tokenize=False,
                                     add_generation_prompt=True)
    assert out == '<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n'


@pytest.mark.parametrize('fmt, placeholder', [('original', '<image>'), ('hf', '<IMG_CONTEXT>')])
def test_image_parts_render_in_place(fmt, placeholder):
    messages = [{'role': 'user', 'content': [
        {'type': 'text', 'text': 'Compare'},
        {'type': 'image'},
        {'type': 'image_url', 'image_url': {'url': 'http://x/y.png'}},
        {'type': 'text', 'text': 'How many cats?'}]}]
    assert _render(fmt, messages) == (
        f'<|im_start|>user\nCompare{placeholder}\n{placeholder}\nHow many cats?<|im_end|>\n'
        '<|im_start|>assistant\n')


def test_hf_format_tokenizer_uses_img_context(tmp_path):
    from transformers import AutoTokenizer

    write_tokenizer(tmp_path, 'hf')
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = tok.apply_chat_template(
        [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': 'What?'}]}],
        tokenize=False, add_generation_prompt=True)
    assert text == '<|im_start|>user\n<IMG_CONTEXT>\nWhat?<|im_end|>\n<|im_start|>assistant\n'
    assert tok.context_image_token_id == 151671
    assert (tok.start_image_token_id, tok.end_image_token_id) == (151669, 151670)


def test_hf_processor_expands_image_tokens(tmp_path):
    pytest.importorskip('torchvision')  # transformers' image/video processors need it
    from PIL import Image
    from transformers import AutoProcessor

    from vlmdeploy.testing.checkpoint import make_checkpoint

    out = make_checkpoint(tmp_path / 'h', 'tiny', 'hf', weights=False)
    proc = AutoProcessor.from_pretrained(out)
    messages = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': 'Hi'}]}]
    text = proc.apply_chat_template(messages, add_generation_prompt=True)
    batch = proc(images=[Image.new('RGB', (896, 448))], text=[text], return_tensors='pt')
    # 2x1 tiles + thumbnail, 256 tokens each.
    assert batch['pixel_values'].shape[0] == 3
    assert int((batch['input_ids'] == 151671).sum()) == 3 * 256
