"""The checkpoint's tokenizer and the special token ids the front end and the engine need.

All ids (image tokens, eos, stop ids) are resolved through the tokenizer and
``generation_config.json``; none is hard-coded. The tokenizer is loaded from standard HF files
without running any code shipped with the checkpoint. Turning generated ids back into text as they
arrive is :class:`~vlmdeploy.frontend.output.IncrementalDetokenizer`'s job.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

IMAGE_SPECIAL_TOKENS = {"img_start": "<img>", "img_end": "</img>", "img_context": "<IMG_CONTEXT>"}


class Tokenizer:
    def __init__(self, model_path: str | Path):
        self.hf = _load_hf_tokenizer(str(model_path))
        self.image_ids = {k: self._id_of(tok) for k, tok in IMAGE_SPECIAL_TOKENS.items()}
        self.eos_token_id: int | None = self.hf.eos_token_id
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


def _load_hf_tokenizer(path: str) -> Any:
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
