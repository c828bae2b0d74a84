"""transformers as the reference for original-format checkpoints: name/config conversion, answerer.

transformers' ``InternVLForConditionalGeneration`` reads only its own (-HF) layout, so this module
converts both ways between it and the original ``InternVLChatModel`` layout that the shipped model
uses: ``hf_to_original`` when the training script saves, ``original_to_hf`` when a test or the
evaluation loads the shipped files back into transformers.

``render_prompt`` builds the prompt exactly as the engine does: image parts are flattened into
``IMAGE_TOKEN`` markers by the engine's placement rules (``flatten_messages``), the checkpoint's
chat template renders the string messages, and each marker becomes ``<img>`` + ``<IMG_CONTEXT>`` x
(256 * tiles) + ``</img>``. Training renders its prompts with it too, so the model learns exactly
what it is later shown. ``ReferenceAnswerer`` decodes greedily with transformers.

transformers is imported lazily: this is test and evaluation tooling, never engine code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlmdeploy.synthetic.questions import Message
from vlmdeploy.vl.constants import IMAGE_TOKEN
from vlmdeploy.vl.tiling import num_tiles, pixel_values

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"

# Per-layer tensor renames, -HF suffix -> original suffix (q/k/v are fused separately).
_VISION_LAYER = {
    "attention.projection_layer.": "attn.proj.",
    "layernorm_before.": "norm1.",
    "layernorm_after.": "norm2.",
    "lambda_1": "ls1",
    "lambda_2": "ls2",
    "mlp.fc1.": "mlp.fc1.",
    "mlp.fc2.": "mlp.fc2.",
}
_FIXED = {
    "model.vision_tower.embeddings.cls_token": "vision_model.embeddings.class_embedding",
    "model.vision_tower.embeddings.position_embeddings":
        "vision_model.embeddings.position_embedding",
    "model.vision_tower.embeddings.patch_embeddings.projection.weight":
        "vision_model.embeddings.patch_embedding.weight",
    "model.vision_tower.embeddings.patch_embeddings.projection.bias":
        "vision_model.embeddings.patch_embedding.bias",
    "lm_head.weight": "language_model.lm_head.weight",
}
_PROJECTOR = {"layer_norm": "0", "linear_1": "1", "linear_2": "3"}
_HF_LAYER = re.compile(r"^model\.vision_tower\.encoder\.layer\.(\d+)\.(.+)$")
_QKV = re.compile(r"^model\.vision_tower\.encoder\.layer\.(\d+)\.attention\.([qkv])_proj\.(\w+)$")


def hf_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """-HF tensor names -> original names, fusing the vision q/k/v projections into ``attn.qkv``."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, t in state.items():
        if m := _QKV.match(name):
            qkv.setdefault((m[1], m[3]), {})[m[2]] = t
        else:
            out[_hf_name_to_original(name)] = t
    for (layer, leaf), parts in qkv.items():
        fused = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)  # (3C, C) or (3C,)
        out[f"vision_model.encoder.layers.{layer}.attn.qkv.{leaf}"] = fused
    return out


def _hf_name_to_original(name: str) -> str:
    if name in _FIXED:
        return _FIXED[name]
    if name.startswith("model.language_model."):
        return "language_model.model." + name[len("model.language_model."):]
    if name.startswith("model.multi_modal_projector."):
        module, leaf = name[len("model.multi_modal_projector."):].split(".")
        return f"mlp1.{_PROJECTOR[module]}.{leaf}"
    if m := _HF_LAYER.match(name):
        for hf, orig in _VISION_LAYER.items():
            if m[2].startswith(hf):
                return f"vision_model.encoder.layers.{m[1]}.{orig}{m[2][len(hf):]}"
    raise KeyError(f"no original-format name for -HF tensor {name!r}")


def original_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original tensor names -> -HF names, splitting ``attn.qkv`` into q/k/v."""
    inverse = {v: k for k, v in _FIXED.items()}
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name in inverse:
            out[inverse[name]] = t
        elif name.startswith("language_model.model."):
            out["model.language_model." + name[len("language_model.model."):]] = t
        elif name.startswith("mlp1."):
            _, idx, leaf = name.split(".")
            module = {v: k for k, v in _PROJECTOR.items()}[idx]
            out[f"model.multi_modal_projector.{module}.{leaf}"] = t
        else:
            out.update(_vision_layer_to_hf(name, t))
    return out


def _vision_layer_to_hf(name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
    m = re.match(r"^vision_model\.encoder\.layers\.(\d+)\.(.+)$", name)
    if not m:
        raise KeyError(f"no -HF name for original tensor {name!r}")
    prefix = f"model.vision_tower.encoder.layer.{m[1]}."
    if m[2].startswith("attn.qkv."):
        leaf = m[2][len("attn.qkv."):]
        q, k, v = t.chunk(3, dim=0)
        return {f"{prefix}attention.{name}_proj.{leaf}": x
                for name, x in zip("qkv", (q, k, v), strict=True)}
    for hf, orig in _VISION_LAYER.items():
        if m[2].startswith(orig):
            return {prefix + hf + m[2][len(orig):]: t}
    raise KeyError(f"no -HF name for original tensor {name!r}")


def hf_config_dict(original: dict[str, Any], image_token_id: int) -> dict[str, Any]:
    """The ``InternVLConfig`` keyword arguments equivalent to an original ``config.json``."""
    v, llm = original["vision_config"], original["llm_config"]
    vision = {
        "hidden_size": v["hidden_size"],
        "num_hidden_layers": v["num_hidden_layers"],
        "num_attention_heads": v["num_attention_heads"],
        "intermediate_size": v["intermediate_size"],
        "attention_bias": v.get("qkv_bias", True),
        "use_qk_norm": v.get("qk_normalization", False),
        "norm_type": v.get("norm_type", "layer_norm"),
        "layer_norm_eps": v.get("layer_norm_eps", 1e-6),
        "hidden_act": v.get("hidden_act", "gelu"),
        "image_size": original.get("force_image_size") or v["image_size"],
        "patch_size": v["patch_size"],
        "use_mean_pooling": True,  # InternViT has no final norm
    }
    text_keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "head_dim", "intermediate_size", "vocab_size", "rms_norm_eps", "rope_theta",
                 "max_position_embeddings", "hidden_act", "tie_word_embeddings")
    text = {k: llm[k] for k in text_keys if k in llm}
    text["model_type"] = "qwen3"
    return {
        "vision_config": vision,
        "text_config": text,
        "image_token_id": image_token_id,
        "downsample_ratio": original.get("downsample_ratio", 0.5),
        "projector_hidden_act": "gelu",
        "vision_feature_layer": original.get("select_layer", -1),
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": llm.get("tie_word_embeddings", False),
    }


def build_hf_model(original: dict[str, Any], image_token_id: int) -> Any:
    """A randomly initialised transformers model with the shapes of an original ``config.json``."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    config = InternVLConfig(**hf_config_dict(original, image_token_id))
    return InternVLForConditionalGeneration(config)


# --- prompts -------------------------------------------------------------------------------------


def flatten_messages(messages: list[Message]) -> tuple[list[dict[str, str]], list[Image.Image]]:
    """String-content messages with ``IMAGE_TOKEN`` where images go, and the images in order.

    The engine's placement rules: when any user text holds ``IMAGE_TOKEN``, each occurrence takes
    the next image and image parts only supply images; otherwise each image part becomes
    ``IMAGE_TOKEN + "\\n"`` where it stands.
    """
    explicit = any(IMAGE_TOKEN in _text(m["content"]) for m in messages if m["role"] == "user")
    images: list[Image.Image] = []
    flat = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            out = []
            for part in content:
                if part["type"] == "text":
                    out.append(part["text"])
                else:
                    images.append(part["image"])
                    out.append("" if explicit else IMAGE_TOKEN + "\n")
            content = "".join(out)
        flat.append({"role": m["role"], "content": content})
    return flat, images


def _text(content: str | list[dict[str, Any]]) -> str:
    if isinstance(content, str):
        return content
    return "".join(p["text"] for p in content if p["type"] == "text")


def image_block(num_tiles: int, tokens_per_tile: int = 256) -> str:
    return IMG_START + IMG_CONTEXT * (tokens_per_tile * num_tiles) + IMG_END


def expand_images(prompt: str, tile_counts: list[int], tokens_per_tile: int = 256) -> str:
    """Replace the i-th ``IMAGE_TOKEN`` with image i's ``<img>...</img>`` token block."""
    pieces = prompt.split(IMAGE_TOKEN)
    if len(pieces) != len(tile_counts) + 1:
        raise ValueError(f"prompt has {len(pieces) - 1} image placeholders for {len(tile_counts)} "
                         "images")
    out = [pieces[0]]
    for n, piece in zip(tile_counts, pieces[1:], strict=True):
        out += [image_block(n, tokens_per_tile), piece]
    return "".join(out)


def render_prompt(tokenizer: Any, messages: list[Message], max_tiles: int,
                  add_generation_prompt: bool = True) -> tuple[str, list[Image.Image]]:
    """The expanded prompt text (chat template + image blocks) and the images it holds."""
    flat, images = flatten_messages(messages)
    text = tokenizer.apply_chat_template(flat, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    counts = [num_tiles(im.width, im.height, max_num=max_tiles) for im in images]
    return expand_images(text, counts), images


# --- the reference answerer ----------------------------------------------------------------------


class ReferenceAnswerer:
    """Greedy answers of transformers' model on an original-format checkpoint directory."""

    def __init__(self, model_dir: str | Path, max_new_tokens: int = 32,
                 device: str = "cpu") -> None:
        from safetensors.torch import load_file
        from transformers import AutoTokenizer

        model_dir = Path(model_dir)
        self.config = json.loads((model_dir / "config.json").read_text())
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        image_token_id = self.tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
        self.model = build_hf_model(self.config, image_token_id).eval()
        state = {}
        for f in sorted(model_dir.glob("*.safetensors")):
            state.update(load_file(str(f)))
        missing, unexpected = self.model.load_state_dict(original_to_hf(state), strict=False)
        if missing or unexpected:
            raise RuntimeError(f"checkpoint mismatch: missing {missing}, unexpected {unexpected}")
        self.device = torch.device(device)
        self.model.float().to(self.device)
        self.max_new_tokens = max_new_tokens
        self.max_tiles = self.config.get("max_dynamic_patch", 12)
        self.eos_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")

    def prompt_inputs(self, messages: list[Message]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(input_ids (1, L), pixel_values (T, 3, 448, 448) or None) for ``messages``."""
        text, images = render_prompt(self.tokenizer, messages, self.max_tiles)
        ids = torch.tensor([self.tokenizer.encode(text, add_special_tokens=False)])
        if not images:
            return ids, None
        pixels = torch.cat([pixel_values(im, max_num=self.max_tiles) for im in images])
        return ids, pixels  # pixels: (sum of tiles, 3, 448, 448)

    @torch.inference_mode()
    def generate_ids(self, messages: list[Message]) -> list[int]:
        ids, pixels = self.prompt_inputs(messages)
        ids = ids.to(self.device)
        pixels = pixels.to(self.device) if pixels is not None else None
        out = self.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
            max_new_tokens=self.max_new_tokens, do_sample=False, eos_token_id=self.eos_id,
            pad_token_id=self.eos_id,
        )
        return out[0, ids.shape[1]:].tolist()

    def __call__(self, messages: list[Message]) -> str:
        return self.tokenizer.decode(self.generate_ids(messages), skip_special_tokens=True)
