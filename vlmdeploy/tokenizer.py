"""The checkpoint's tokenizer, the special token ids the engine needs, and incremental
detokenization.

All ids (image tokens, eos, stop ids) are resolved through the tokenizer and
``generation_config.json``; none is hard-coded. The tokenizer is loaded from standard HF files
without running any code shipped with the checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # tokenizers < 0.21
    DecodeStream = None

from transformers import AutoTokenizer

IMAGE_SPECIAL_TOKENS = {"img_start": "<img>", "img_end": "</img>", "img_context": "<IMG_CONTEXT>"}


class Tokenizer:
    def __init__(self, model_path: str | Path):
        self.hf = _load_hf_tokenizer(str(model_path))
        self.image_ids = {k: self._id_of(tok) for k, tok in IMAGE_SPECIAL_TOKENS.items()}
        self.eos_token_id = self.hf.eos_token_id
        self.stop_ids = frozenset(_generation_eos(Path(model_path)) | {self.eos_token_id} - {None})
        self.chat_template: str | None = getattr(self.hf, "chat_template", None)
        self.vocab_size = len(self.hf)

    def _id_of(self, token: str) -> int:
        tid = self.hf.convert_tokens_to_ids(token)
        if (
            tid is None
            or tid == self.hf.unk_token_id
            or self.hf.convert_ids_to_tokens(tid) != token
        ):
            raise ValueError(
                f"the tokenizer has no {token!r} token; it is not an InternVL tokenizer"
            )
        return tid

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)


def _load_hf_tokenizer(path: str):
    # transformers probes config.json, whose original-format model_type it does not know, and
    # warns; the tokenizer itself loads from the standard tokenizer files, so it is silenced.
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    finally:
        hf_logging.set_verbosity(level)


def _generation_eos(model_path: Path) -> set[int]:
    path = model_path / "generation_config.json"
    if not path.is_file():
        return set()
    eos = json.loads(path.read_text()).get("eos_token_id")
    if eos is None:
        return set()
    return {eos} if isinstance(eos, int) else set(eos)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without re-decoding everything each step.

    Text is released only once it no longer ends in an incomplete UTF-8 sequence, so a multi-byte
    character split across tokens is emitted whole. With a fast tokenizer this is the tokenizers
    library's ``DecodeStream`` (one native call per token); otherwise two windowed decodes per
    token. ``flush()`` at the end makes the total text equal to decoding all ids at once. A request
    uses either ``add`` (streaming) or ``append`` (decode once at the end), not both.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""
        self._backend = getattr(tokenizer.hf, "backend_tokenizer", None)
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens) if (
            self._backend is not None and DecodeStream is not None) else None

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        if self._stream is not None:
            delta = self._stream.step(self._backend, token_id) or ""
            self.text += delta
            return delta
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset], self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset :], self.skip)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta

    def append(self, token_id: int) -> None:
        """Take a token without decoding now: ``flush()`` at the end decodes everything once."""
        self.ids.append(token_id)

    def flush(self) -> str:
        """Whatever is still held back (e.g. a trailing incomplete character) at the end of
        generation."""
        full = self.tok.decode(self.ids, self.skip)
        delta = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text += delta
        return delta
