"""The shipped default model's files: size, tensor names and shapes, config, tokenizer, template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import vlmdeploy
from vlmdeploy.config import ModelConfig
from vlmdeploy.frontend.chat_template import ChatTemplate
from vlmdeploy.frontend.prompt import build_conversation
from vlmdeploy.synthetic.questions import generate_questions
from vlmdeploy.synthetic.reference import flatten_messages, hf_to_original, original_to_hf
from vlmdeploy.testing.checkpoint import file_tensors
from vlmdeploy.testing.presets import get_preset

MODEL_DIR = Path(vlmdeploy.__file__).parent / "assets" / "internvl3_5-shapes-tiny"
REQUIRED = {"<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<img>",
            "</img>", "<IMG_CONTEXT>"}


@pytest.fixture(scope="module")
def config() -> dict:
    return json.loads((MODEL_DIR / "config.json").read_text())


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(MODEL_DIR))


def test_files_are_small_and_weights_are_safetensors():
    files = [p for p in MODEL_DIR.iterdir() if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 25 * 10**6
    assert {p.suffix for p in files} <= {".json", ".safetensors", ".md"}  # no pickle, no code
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "model.safetensors", "README.md"):
        assert (MODEL_DIR / name).is_file(), name


def _expected_tensors(config: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes the project's checkpoint generator writes for these shapes (original)."""
    v, t = config["vision_config"], config["llm_config"]
    vision_keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                   "qkv_bias", "qk_normalization", "norm_type")
    text_keys = ("hidden_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "intermediate_size", "head_dim", "vocab_size",
                 "tie_word_embeddings")
    preset = get_preset("tiny", vision_overrides={k: v[k] for k in vision_keys},
                        text_overrides={k: t[k] for k in text_keys})
    return {ft.name: tuple(ft.shape) for ft in file_tensors(preset, "original")}


def test_tensors_have_the_original_names_and_shapes(config):
    with safe_open(str(MODEL_DIR / "model.safetensors"), framework="pt") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert stored == _expected_tensors(config)
    assert dtypes == {"BF16"} and config["torch_dtype"] == "bfloat16"


def test_config_is_original_format_and_parses(config):
    assert config["architectures"] == ["InternVLChatModel"]
    assert config["llm_config"]["architectures"] == ["Qwen3ForCausalLM"]
    assert config["ps_version"] == "v2" and config["downsample_ratio"] == 0.5
    parsed = ModelConfig.from_pretrained(MODEL_DIR)
    assert parsed.checkpoint_format == "original"
    assert parsed.tokens_per_tile == 256 and parsed.vision.num_patches == 1024
    assert 2 <= parsed.max_dynamic_patch <= 6  # images of varied shapes get 1..N tiles
    assert not parsed.text.tie_word_embeddings and parsed.text.rope_theta == 1e6


def test_name_conversion_round_trips():
    from safetensors.torch import load_file

    state = load_file(str(MODEL_DIR / "model.safetensors"))
    back = hf_to_original(original_to_hf(state))
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_tokenizer_loads_both_ways_with_the_special_tokens(tokenizer, config):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    for token in REQUIRED:
        token_id = tokenizer.convert_tokens_to_ids(token)
        assert token_id == raw.token_to_id(token) is not None
        assert tokenizer.encode(token, add_special_tokens=False) == [token_id]
    assert tokenizer.eos_token == "<|im_end|>"
    assert len(tokenizer) <= config["llm_config"]["vocab_size"]
    assert config["llm_config"]["eos_token_id"] == tokenizer.eos_token_id
    # Thinking markers stay in decoded text (not special), as in Qwen3.
    ids = tokenizer.encode("<think>x</think>two<|im_end|>", add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>x</think>two"
    text = "Any text, even ünïcode, encodes: 42!"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_chat_template_is_chatml_without_system_prompt(tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n"
                        "<|im_start|>user\n<image>\nq<|im_end|>\n<|im_start|>assistant\n")


def test_engine_renders_the_prompts_the_model_was_trained_on(tokenizer):
    # The engine flattens messages and renders the checkpoint's template; training used
    # reference.flatten_messages + the same template. Both must give the same text.
    template = ChatTemplate(tokenizer.chat_template)
    for q in generate_questions(21, 18):
        conv = build_conversation(q.messages)
        flat, images = flatten_messages(q.messages)
        ours = tokenizer.apply_chat_template(flat, tokenize=False, add_generation_prompt=True)
        assert template.render(conv.messages) == ours
        assert len(conv.images) == len(images)
