"""The model directory's files other than the weights: the tokenizer files, ``config.json`` and
``generation_config.json``.

Contract: ``write_model_files(out, text_layers)`` writes them into ``out`` and returns the loaded
tokenizer and the config. They depend on nothing but the code and ``text_layers``: the tokenizer is
byte-level BPE trained on a fixed corpus (the questions of the training stream's seed), so every
stage of a multi-stage run writes the same tokenizer, and a later stage's ``--init-from`` weights
fit its vocabulary. The config is in the original ``InternVLChatModel`` layout, the one the engine
and the released InternVL3.5 checkpoints use, not transformers' converted one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from vlmdeploy.synthetic.questions import generate_questions
from vlmdeploy.vl.constants import IMAGE_TOKEN

from .stream import TRAIN_SEED

# At most this many tiles per image (plus a thumbnail when there are several): the config's
# max_dynamic_patch, and also the tiling the training batches use, so training sees the tiles that
# the engine will make from the shipped config.
MAX_DYNAMIC_PATCH = 4

# Qwen's pre-tokenization split (contractions, letters, single digits, punctuation, newlines).
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# (token, special): ChatML, Qwen3's thinking markers (not special, so decoding keeps them), and
# InternVL's image tokens. Ids follow the BPE vocabulary; engines resolve them by name.
ADDED_TOKENS = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
                ("<think>", False), ("</think>", False),
                ("<img>", True), ("</img>", True), ("<IMG_CONTEXT>", True)]

# ChatML with no default system prompt. A string content renders as is (the engine flattens
# messages to strings with IMAGE_TOKEN where images go, then renders); for tools that pass content
# parts, an image part renders as InternVL's "<image>\n" in place, a text part as its text.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] in ['image', 'image_url', 'image_data'] -%}{{- '<image>\\n' -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

VISION = {"hidden_size": 128, "num_hidden_layers": 6, "num_attention_heads": 4,
          "intermediate_size": 512}
TEXT = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 64, "intermediate_size": 768}


# --- tokenizer -----------------------------------------------------------------------------------


def _corpus(n: int) -> list[str]:
    """Every text the task produces (questions, answers, role names, image labels)."""
    texts = ["user\n", "assistant\n", "system\n"] + [f"Image-{i}: " for i in range(1, 10)]
    for q in generate_questions(TRAIN_SEED, n):
        for m in q.messages:
            c = m["content"]
            text = c if isinstance(c, str) else "".join(p["text"] for p in c if p["type"] == "text")
            texts.append(text.replace(IMAGE_TOKEN, ""))
        texts.append(q.answer)
    return texts


def build_tokenizer() -> Any:
    """Byte-level BPE (any text encodes) whose merges cover the task's words, plus added tokens."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(3000), trainer)
    for text, special in ADDED_TOKENS:
        token = AddedToken(text, special=special, normalized=False)
        (tok.add_special_tokens if special else tok.add_tokens)([token])
    return tok


def write_tokenizer(tok: Any, out: Path) -> None:
    tok.save(str(out / "tokenizer.json"))
    decoder = {}
    for text, special in ADDED_TOKENS:
        decoder[str(tok.token_to_id(text))] = {
            "content": text, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": special}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": decoder,
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "unk_token": None,
        "additional_special_tokens": [t for t, s in ADDED_TOKENS if s and t != "<|endoftext|>"],
        "clean_up_tokenization_spaces": False, "split_special_tokens": False,
        "model_max_length": 8192, "errors": "replace", "chat_template": CHAT_TEMPLATE,
    }
    special_map = {k: config[k] for k in ("eos_token", "pad_token", "additional_special_tokens")}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


# --- config --------------------------------------------------------------------------------------


def original_config(vocab_size: int, eos_id: int, pad_id: int,
                    text_layers: int = TEXT["num_hidden_layers"]) -> dict[str, Any]:
    """``config.json`` in the original ``InternVLChatModel`` layout, with a language model of
    ``text_layers`` layers (``--text-layers``: a later stage may grow the model)."""
    llm = {
        # The depth is set after **TEXT, so the key keeps TEXT's position in the written file.
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **TEXT,
        "num_hidden_layers": text_layers,
        "vocab_size": vocab_size, "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0,
        "max_position_embeddings": 8192, "hidden_act": "silu", "attention_bias": False,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "bos_token_id": pad_id, "eos_token_id": eos_id,
    }
    vision = {
        "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", **VISION,
        "qkv_bias": True, "qk_normalization": False, "norm_type": "layer_norm",
        "layer_norm_eps": 1e-6, "hidden_act": "gelu", "image_size": 448, "patch_size": 14,
        "num_channels": 3, "drop_path_rate": 0.0, "use_flash_attn": False,
        "torch_dtype": "bfloat16",
    }
    return {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
        "template": "internvl2_5", "torch_dtype": "bfloat16",
        "downsample_ratio": 0.5, "ps_version": "v2", "select_layer": -1,
        "force_image_size": 448, "dynamic_image_size": True, "use_thumbnail": True,
        "min_dynamic_patch": 1, "max_dynamic_patch": MAX_DYNAMIC_PATCH,
        "tie_word_embeddings": False, "use_backbone_lora": 0, "use_llm_lora": 0,
        "llm_config": llm, "vision_config": vision,
    }


def write_model_files(out: Path, text_layers: int) -> tuple[Any, dict[str, Any]]:
    """Write the tokenizer files, ``config.json`` and ``generation_config.json`` into ``out``
    (created if needed); return the tokenizer, loaded back from ``out`` as users will load it, and
    the config."""
    from transformers import AutoTokenizer  # late: the command line is checked before this import

    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(build_tokenizer(), out)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    # The embedding and output matrices get a multiple of 64 rows (spare rows are never used).
    vocab = 64 * math.ceil(len(tokenizer) / 64)
    config = original_config(vocab, tokenizer.eos_token_id, tokenizer.pad_token_id, text_layers)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # Generation stops at <|im_end|> (the end of an assistant turn) or at <|endoftext|>.
    gen = {"bos_token_id": tokenizer.pad_token_id,
           "eos_token_id": [tokenizer.eos_token_id, tokenizer.pad_token_id],
           "pad_token_id": tokenizer.pad_token_id}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return tokenizer, config
