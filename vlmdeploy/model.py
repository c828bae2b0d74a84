"""LMDeploy's ``ChatTemplateConfig`` (``from vlmdeploy import ChatTemplateConfig``, or from
``vlmdeploy.model`` as from ``lmdeploy.model``).

LMDeploy 0.18 renders a model's prompt with the checkpoint's own template (its ``hf`` template,
the default) or with a template built from the config's pieces (``base``, or a JSON file with
``system``, ``meta_instruction``, ``eosys``, ``user``, ``eoh``, ``assistant``, ``eoa``,
``separator``, ``tool``, ``eotool``). vlmdeploy does the same:

* ``hf``, and the names earlier LMDeploy versions used for InternVL and Qwen templates
  (``internvl2_5``, ``internvl3``, ``qwen3``, ...), use the checkpoint's own template: it is the
  one InternVL3.5 was trained with;
* ``base``, a name LMDeploy does not know, or a config from a JSON file: the pieces are
  concatenated as LMDeploy's base template does (each message is ``box + content + end`` for its
  role; a first message that is not a system message gets ``system + meta_instruction + eosys``
  before it; the prompt ends with ``assistant``); ``stop_words`` are added to every request's;
* LMDeploy's templates of other model families (``llama2``, ``vicuna``, ``deepseek-vl2``, ...) are
  refused with ``NotImplementedError``: InternVL3.5 was not trained on them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any, Literal

logger = logging.getLogger("vlmdeploy")

# LMDeploy 0.18's built-in templates for other model families
OTHER_FAMILIES = ("cogvlm", "vicuna", "llava-v1", "llama2", "codellama", "chatglm", "mistral",
                  "mixtral", "internvl-zh", "deepseek-vl", "deepseek-vl2", "deepseek-v4",
                  "deepseek-v32", "deepseek-v3.2", "llava-chatml")
_CHECKPOINT_PREFIXES = ("hf", "internvl", "qwen")
_PIECES = ("system", "meta_instruction", "eosys", "user", "eoh", "assistant", "eoa", "separator",
           "tool", "eotool")

# LMDeploy's base template as Jinja; the pieces come in as the variable `ct`
BASE_TEMPLATE = (
    "{%- if messages and messages[0].role != 'system' -%}"
    "{{- ct.system + ct.meta_instruction + ct.eosys -}}{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- set box = {'user': ct.user, 'assistant': ct.assistant, 'system': ct.system, "
    "'tool': ct.tool}[m.role] -%}"
    "{%- set end = {'user': ct.eoh, 'assistant': ct.eoa + ct.separator, 'system': ct.eosys, "
    "'tool': ct.eotool}[m.role] -%}"
    "{{- box + m.content -}}{%- if not (loop.last and m.role == 'assistant') -%}{{- end -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt and not (messages and messages[-1].role == 'assistant') -%}"
    "{{- ct.assistant -}}{%- endif -%}"
)


@dataclass
class ChatTemplateConfig:
    """Parameters of a chat template (LMDeploy's fields and defaults)."""

    model_name: str
    model_path: str | None = None
    system: str | None = None
    meta_instruction: str | None = None
    eosys: str | None = None
    user: str | None = None
    eoh: str | None = None
    assistant: str | None = None
    eoa: str | None = None
    tool: str | None = None
    eotool: str | None = None
    separator: str | None = None
    capability: Literal["completion", "infilling", "chat", "python"] | None = None
    stop_words: list[str] | None = None

    @property
    def uses_checkpoint_template(self) -> bool:
        pieces = any(getattr(self, p) is not None for p in _PIECES)
        return not pieces and self.model_name.lower().startswith(_CHECKPOINT_PREFIXES)

    def jinja(self) -> tuple[str, dict[str, Any]] | None:
        """The template and its variables, or None for the checkpoint's own template."""
        if self.capability not in (None, "chat"):
            raise NotImplementedError(f"ChatTemplateConfig.capability={self.capability!r} is not "
                                      "supported: vlmdeploy serves chat")
        if self.model_name in OTHER_FAMILIES:
            raise NotImplementedError(
                f"the {self.model_name!r} chat template is another model family's; InternVL3.5 "
                "uses its checkpoint's own ('hf'), or pass the pieces of a template")
        if self.uses_checkpoint_template:
            if self.model_name != "hf":
                logger.info("chat template %r: the checkpoint's own template is used",
                            self.model_name)
            return None
        if not any(getattr(self, p) for p in _PIECES):
            raise ValueError(f"unknown chat template {self.model_name!r} without pieces: use "
                             "'hf' (the checkpoint's template) or give system, user, eoh, ...")
        return BASE_TEMPLATE, {"ct": {p: getattr(self, p) or "" for p in _PIECES}}

    def to_json(self, file_path: str | None = None) -> str:
        text = json.dumps(dataclasses.asdict(self), ensure_ascii=False, indent=4)
        if file_path:
            with open(file_path, "w", encoding="utf-8") as f:
                f.write(text)
        return text

    @classmethod
    def from_json(cls, file_or_string: str) -> ChatTemplateConfig:
        """A config from a JSON file or string (LMDeploy's format; a missing model_name gets a
        random one, i.e. a base template of the given pieces)."""
        try:
            with open(file_or_string, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            text = file_or_string
        except OSError:
            raise ValueError("Invalid input. Must be a file path or a valid JSON string.") \
                from None
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a chat template config must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown chat template fields: {', '.join(sorted(unknown))}")
        data.setdefault("model_name", None)
        if data["model_name"] is None:
            data["model_name"] = uuid.uuid4().hex
        return cls(**data)
