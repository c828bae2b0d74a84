"""Train the embedded default model: a tiny InternVL3.5 (InternViT + pixel shuffle + mlp1 + Qwen3).

Reproducible from its arguments: the tokenizer is trained on a fixed generated corpus, the weights
are initialised after ``torch.manual_seed(seed)``, and training sample ``i`` is the pure function
``make_question(TRAIN_SEED, i, kind_of(i))`` of its index, so the data stream does not depend on the
number of loader workers. (On a GPU, floating-point reductions are not bitwise deterministic; on the
CPU a rerun is bitwise identical.)

Steps: build the tokenizer (ChatML + InternVL image tokens, byte-level BPE over the task's
vocabulary); write ``config.json`` in the original ``InternVLChatModel`` layout; train
transformers' ``InternVLForConditionalGeneration`` on prompts rendered exactly as the engine
renders them (``reference.render_prompt``), with the loss on assistant tokens plus, optionally
(``--aux``), dense targets on the image tokens from training-only linear heads; save the weights
under their original names (bf16 safetensors); evaluate greedy exact-answer accuracy on held-out
questions (``--eval-n``, seed ``EVAL_SEED``).

    python tools/train_default_model.py --out DIR --steps 2303 --warmup 300 --aux none
    python tools/train_default_model.py --out DIR2 --init-from DIR --data-offset 100000 \
        --steps 2000 --warmup 100 --aux tokens     # a second stage on fresh questions

With ``--steps 0 --time-budget S`` the number of steps is fixed after ``--calibrate`` steps
(inside the warmup, so the schedule equals that of ``--steps N`` with the N printed). The model
card (``vlmdeploy/assets/internvl3_5-shapes-tiny/README.md``) lists the exact commands behind the
shipped weights.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _bare_packages() -> None:
    """Register ``vlmdeploy`` and ``vlmdeploy.vl`` as bare packages, so importing the leaf modules
    training needs (``synthetic``, ``vl.tiling``, ``vl.constants``) never runs the package
    ``__init__`` files, which import the engine: training must not depend on engine code."""
    for name, path in (("vlmdeploy", ROOT / "vlmdeploy"), ("vlmdeploy.vl", ROOT / "vlmdeploy/vl")):
        module = types.ModuleType(name)
        module.__path__ = [str(path)]
        sys.modules[name] = module


_bare_packages()

from vlmdeploy.synthetic.eval import evaluate  # noqa: E402
from vlmdeploy.synthetic.questions import (  # noqa: E402
    COUNT_PROMPTS,
    FEWER_PROMPT,
    KINDS,
    MORE_PROMPT,
    MULTI_IMAGE_PREFIX,
    Message,
    Question,
    generate_questions,
    make_question,
    questions_about,
)
from vlmdeploy.synthetic.reference import (  # noqa: E402
    ReferenceAnswerer,
    build_hf_model,
    hf_to_original,
    original_to_hf,
    render_prompt,
)
from vlmdeploy.synthetic.scene import COLOURS, SHAPES, SLOTS, Scene, render_labels  # noqa: E402
from vlmdeploy.vl.constants import IMAGE_TOKEN  # noqa: E402
from vlmdeploy.vl.tiling import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    target_grid,
    tile_array,
)

TRAIN_SEED = 0  # question stream used for training and for the tokenizer corpus
EVAL_SEED = 1000  # held-out question stream of the reported evaluation
MAX_DYNAMIC_PATCH = 4
# Training mix: descriptions and the two-image/two-turn forms are the hardest, so they get more.
KIND_WEIGHTS = {"describe": 0.22, "count": 0.14, "colour": 0.1, "position": 0.14,
                "multi_image": 0.2, "multi_turn": 0.2}

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
# Share of training prompts in the other forms users send: a single image after the text
# (OpenAI-style [text, image] parts) and two images without "Image-i:" labels.
TEXT_FIRST_SHARE = 0.15
UNLABELLED_SHARE = 0.2

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


def original_config(vocab_size: int, eos_id: int, pad_id: int) -> dict[str, Any]:
    """``config.json`` in the original ``InternVLChatModel`` layout."""
    llm = {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **TEXT,
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


# --- data ----------------------------------------------------------------------------------------


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


def scene_slots(scene: Scene) -> np.ndarray:
    """The (shape, colour) class in each slot: 0 empty, else 1 + shape * 4 + colour. (5,)"""
    slots = np.zeros(len(SLOTS), dtype=np.int64)
    for o in scene.objects:
        shape, colour = SHAPES.index(o.shape), COLOURS.index(o.colour)
        slots[SLOTS.index(o.slot)] = 1 + shape * len(COLOURS) + colour
    return slots


def token_labels(scene: Scene, crop_slots: bool = False) -> np.ndarray:
    """Dense targets of each image token: (tiles, 256, 8) int64, 0 = background/empty.

    Columns 0-2: shape, colour and slot class of the object under the token. Token (i, j) of a
    tile covers tile pixels [28i, 28i+28) x [28j, 28j+28) (pixel shuffle v2 order), so it takes
    the object map at that square's centre, tiled with the same grid and thumbnail as the pixels
    (nearest-neighbour instead of bicubic). The slot is only a target on whole-image tiles: a
    crop does not show where it lies in the image (-100 on crop tiles, unless ``crop_slots``, the
    targets the first stages trained on). Columns 3-7: the whole
    scene, the (shape, colour) class in each slot, on every token of a tile that shows the whole
    image (the single tile or the thumbnail); -100 (ignored) on crop tiles, which show part of
    it.
    """
    table = np.zeros((len(scene.objects) + 1, 3), dtype=np.int64)
    slots = scene_slots(scene)
    for i, o in enumerate(scene.objects):
        shape, colour, slot = SHAPES.index(o.shape), COLOURS.index(o.colour), SLOTS.index(o.slot)
        table[i + 1] = (shape + 1, colour + 1, slot + 1)
    objects = render_labels(scene)
    cols, rows = target_grid(scene.width, scene.height, 1, MAX_DYNAMIC_PATCH)
    grid = np.asarray(objects.resize((448 * cols, 448 * rows), Image.Resampling.NEAREST))
    centres = grid[14::28, 14::28].reshape(rows, 16, cols, 16).transpose(0, 2, 1, 3)
    maps = [centres.reshape(rows * cols, 16, 16)]  # row-major tiles
    whole = np.full((rows * cols, len(SLOTS)), -100, dtype=np.int64)
    if rows * cols > 1:
        thumb = np.asarray(objects.resize((448, 448), Image.Resampling.NEAREST))
        maps.append(thumb[14::28, 14::28][None])
        whole = np.concatenate([whole, slots[None]])
    else:
        whole[0] = slots
    local = table[np.concatenate(maps).reshape(-1, 256)]  # (T, 256, 3)
    # A crop tile cannot tell where in the whole image it lies, so no slot target there.
    if rows * cols > 1 and not crop_slots:
        local[:rows * cols, :, 2] = -100
    scene_cols = np.broadcast_to(whole[:, None, :], (len(whole), 256, len(SLOTS)))
    return np.concatenate([local, scene_cols], axis=-1)  # (T, 256, 8)


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


class TrainSet(torch.utils.data.Dataset):
    """Sample ``i``: the token ids and loss labels (assistant tokens) of each question of
    ``sample_questions(i)``, and the uint8 tiles and dense targets of their shared image(s)."""

    def __init__(self, tokenizer: Any, length: int, offset: int = 0,
                 plain_share: float = 0.0, per_scene: int = 1, all_tokens: bool = False,
                 absent_share: float = 0.0) -> None:
        self.tok = tokenizer
        self.length = length
        self.offset = offset  # a later training stage reads fresh questions
        self.plain_share = plain_share
        self.per_scene = per_scene
        self.all_tokens = all_tokens  # the first stages' dense targets (see --local-targets)
        self.absent_share = absent_share
        self.im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
        self.im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.assistant = tokenizer.encode("assistant\n", add_special_tokens=False)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        index += self.offset
        questions = sample_questions(index, self.per_scene, self.absent_share)
        ids, labels, images = [], [], None
        for j, q in enumerate(questions):
            key = index if j == 0 else f"{index}/{j}"  # the first keeps its single-question form
            messages = prompt_form(key, q.kind, q.messages, self.plain_share)
            messages.append({"role": "assistant", "content": q.answer})
            text, shown = render_prompt(self.tok, messages, MAX_DYNAMIC_PATCH,
                                        add_generation_prompt=False)
            if images is None:
                images = shown
            # Every question shows the same image objects in the same order: one set of tiles.
            assert len(shown) == len(images) and all(a is b for a, b in zip(shown, images))
            ids.append(self.tok.encode(text, add_special_tokens=False))
            labels.append(self._labels(ids[-1]))
        pixels = np.concatenate([tile_array(im, max_num=MAX_DYNAMIC_PATCH) for im in images])
        aux = np.concatenate([token_labels(scene, self.all_tokens)
                              for scene in questions[0].scenes])
        scene_of = {id(im): sc for im, sc in zip(questions[0].images, questions[0].scenes)}
        slots = np.stack([scene_slots(scene_of[id(im)]) for im in images])  # (images, 5)
        return {"ids": [torch.tensor(x) for x in ids],
                "labels": [torch.tensor(x) for x in labels],
                "pixels": torch.from_numpy(pixels),  # (T, 448, 448, 3) uint8
                "aux": torch.from_numpy(aux),  # (T, 256, 8)
                "slots": torch.from_numpy(slots)}  # (images, 5), in the order the prompt shows them

    def _labels(self, ids: list[int]) -> list[int]:
        """Targets: each assistant turn's content and its closing ``<|im_end|>``; -100 elsewhere."""
        labels = [-100] * len(ids)
        head = [self.im_start, *self.assistant]
        i = 0
        while i < len(ids):
            if ids[i:i + len(head)] == head:
                i += len(head)
                while i < len(ids):
                    labels[i] = ids[i]
                    i += 1
                    if ids[i - 1] == self.im_end:
                        break
            else:
                i += 1
        return labels


def collate(samples: list[dict[str, Any]], pad_id: int, img_end_id: int = -1
            ) -> dict[str, torch.Tensor]:
    """Right-padded sequences of all questions, the tiles of all samples, and ``tiles``: for each
    sequence in order, the indices of its sample's tiles (image features are computed once per
    tile and gathered for every sequence that shows them). ``ends`` (B, L, 5) holds, at each
    image's closing ``</img>`` token, the content of that image's five slots (-100 elsewhere)."""
    seqs = [pair for s in samples for pair in zip(s["ids"], s["labels"])]
    length = max(len(i) for i, _ in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), length), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for row, (seq, target) in enumerate(seqs):
        n = len(seq)
        ids[row, :n], labels[row, :n], mask[row, :n] = seq, target, 1
    tiles, start = [], 0
    for s in samples:
        n = len(s["pixels"])
        tiles += [torch.arange(start, start + n)] * len(s["ids"])
        start += n
    ends = torch.full((*ids.shape, len(SLOTS)), -100, dtype=torch.long)
    rows = [s["slots"] for s in samples for _ in s["ids"]]
    for row, slots in enumerate(rows):
        at = (ids[row] == img_end_id).nonzero().flatten()
        if img_end_id >= 0:
            assert len(at) == len(slots), (len(at), len(slots))
            ends[row, at] = slots
    return {"ids": ids, "labels": labels, "mask": mask, "tiles": torch.cat(tiles), "ends": ends,
            "pixels": torch.cat([s["pixels"] for s in samples]),
            "aux": torch.cat([s["aux"] for s in samples])}


def normalise(pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> ImageNet-normalised (T, 3, H, W), done on the device to spare CPUs."""
    mean = torch.tensor(IMAGENET_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=pixels.device).view(1, 3, 1, 1)
    x = pixels.permute(0, 3, 1, 2).float() / 255.0
    return ((x - mean) / std).to(dtype)


# --- training ------------------------------------------------------------------------------------


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    # No weight decay on norms, biases, layer scales, position/cls embeddings (all vectors).
    decay = [p for p in model.parameters() if p.dim() >= 2 and p.shape[0] > 1]
    other = [p for p in model.parameters() if not (p.dim() >= 2 and p.shape[0] > 1)]
    groups = [{"params": decay, "weight_decay": 0.05}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=torch.cuda.is_available())


class AuxHeads(torch.nn.Module):
    """Training-only linear heads on the projected image tokens (see ``token_labels``): the
    object under each token, and on whole-image tiles the content of every slot. Dense
    supervision teaches the vision tower far faster than the answer tokens alone, and the scene
    summary on every token of the whole-image tile leaves the language model a lookup instead of
    counting and binding over hundreds of tokens. The heads are not part of the saved model."""

    def __init__(self, hidden: int, scene: bool, all_tokens: bool = False) -> None:
        super().__init__()
        self.all_tokens = all_tokens
        scene_classes = 1 + len(SHAPES) * len(COLOURS)
        self.sizes = (len(SHAPES) + 1, len(COLOURS) + 1, len(SLOTS) + 1,
                      *([scene_classes] * len(SLOTS) if scene else []))
        self.proj = torch.nn.Linear(hidden, sum(self.sizes))

    def forward(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.proj(feats).float().split(self.sizes, dim=-1)  # k x (T, 256, n_k)

        def ce(k: int, target: torch.Tensor) -> torch.Tensor:
            if not bool((target != -100).any()):
                return logits[k].sum() * 0.0
            return F.cross_entropy(logits[k].reshape(-1, self.sizes[k]), target.reshape(-1),
                                   ignore_index=-100)

        # Objects cover ~2% of the tokens: over all tokens the loss is low while the object
        # tokens are barely learnt, so object vs background is one term and the shape, colour
        # and slot of object tokens are terms of their own.
        on_object = labels[..., 0] > 0
        if self.all_tokens:  # the first stages: each column over every token, background included
            local = [ce(k, labels[..., k]) for k in range(3)]
        else:
            local = [ce(0, labels[..., 0])]
            local += [ce(k, labels[..., k].masked_fill(~on_object, -100)) for k in range(3)]
        self.object_accuracy = [
            float((logits[k].argmax(-1) == labels[..., k])[on_object & (labels[..., k] >= 0)]
                  .float().mean()) for k in range(3)]
        local_loss = sum(local) / len(local)
        if len(logits) == 3:
            return local_loss
        scene = [ce(k, labels[..., k]) for k in range(3, len(logits))]
        return (local_loss + sum(scene) / len(scene)) / 2


def image_features(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """What the language model receives for each tile: (T, 256, H). Same modules and order as
    transformers' own ``get_image_features``."""
    inner = model.model
    vis = inner.vision_tower(pixel_values=pixels).last_hidden_state[:, 1:]  # (T, 1024, C), no CLS
    t, n, c = vis.shape
    side = math.isqrt(n)
    vis = inner.pixel_shuffle(vis.reshape(t, side, side, c), scale_factor=0.5)  # (T, 16, 16, 4C)
    return inner.multi_modal_projector(vis.reshape(t, -1, vis.shape[-1]))  # (T, 256, H)


class SummaryHead(torch.nn.Module):
    """Training-only: from the language model's hidden state at each image's closing ``</img>``
    token after ``layer`` layers, the content of the image's five slots. It teaches the language
    model to gather the whole-image tile (the 256 tokens just before ``</img>``) into one place
    that answers can read, instead of mixing in crop tiles, which cannot tell where they lie."""

    def __init__(self, hidden: int, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.classes = 1 + len(SHAPES) * len(COLOURS)
        self.norm = torch.nn.LayerNorm(hidden)  # the residual stream's scale varies by layer
        self.proj = torch.nn.Linear(hidden, len(SLOTS) * self.classes)

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(summed loss, number of targets) over the positions where ``targets`` is set."""
        at = targets[..., 0] != -100
        if not bool(at.any()):
            return hidden.sum() * 0.0, 0
        logits = self.proj(self.norm(hidden[at])).float().view(-1, self.classes)
        target = targets[at].reshape(-1)
        return F.cross_entropy(logits, target, reduction="sum"), len(target)


def loss_of(model: torch.nn.Module, heads: AuxHeads, batch: dict[str, torch.Tensor],
            dtype: torch.dtype, aux_weight: float, chunks: int = 4,
            summary: SummaryHead | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(answer-token loss, dense image-token loss, ``</img>`` summary loss) of one batch.

    Sequences are right-padded, so under the causal mask no real token sees padding and no mask
    is needed (attention takes its fused causal path); they run in ``chunks`` groups of similar
    length, so short ones are not padded to the longest of the batch."""
    feats = image_features(model, normalise(batch["pixels"], dtype))
    embeds = model.get_input_embeddings()(batch["ids"])  # (B, L, H)
    slots = (batch["ids"] == model.config.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(slots, feats[batch["tiles"]].to(embeds.dtype))
    lengths = batch["mask"].sum(1)
    total = torch.zeros((), device=embeds.device)
    summed, counted = torch.zeros((), device=embeds.device), 0
    for rows in torch.argsort(lengths).chunk(chunks):
        n = int(lengths[rows].max())
        out = model(inputs_embeds=embeds[rows, :n], output_hidden_states=summary is not None)
        logits = out.logits[:, :-1].float()
        total = total + F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                        batch["labels"][rows, 1:n].reshape(-1),
                                        ignore_index=-100, reduction="sum")
        if summary is not None:
            part, count = summary(out.hidden_states[summary.layer], batch["ends"][rows, :n])
            summed, counted = summed + part, counted + count
    lm = total / (batch["labels"][:, 1:] != -100).sum()
    aux = heads(feats, batch["aux"]) if aux_weight else torch.zeros((), device=lm.device)
    return lm, aux, summed / max(1, counted)


def train(args: argparse.Namespace, model: torch.nn.Module, tokenizer: Any) -> dict[str, Any]:
    device = torch.device(args.device)
    amp = device.type == "cuda"
    pixel_dtype = torch.bfloat16 if amp else torch.float32
    max_steps = args.steps or 10**6
    data = TrainSet(tokenizer, max_steps * args.batch_size, args.data_offset, args.plain_share,
                    args.questions_per_scene, args.local_targets == "all-tokens",
                    args.absent_share)
    img_end = tokenizer.convert_tokens_to_ids("</img>")
    loader = torch.utils.data.DataLoader(
        data, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
        collate_fn=lambda s: collate(s, tokenizer.pad_token_id, img_end), pin_memory=amp,
        persistent_workers=args.workers > 0, prefetch_factor=8 if args.workers else None)
    all_tokens = args.local_targets == "all-tokens"
    heads = AuxHeads(model.config.text_config.hidden_size, args.aux == "scene",
                     all_tokens).to(device)
    aux_weight = 0.0 if args.aux == "none" else args.aux_weight
    hidden = model.config.text_config.hidden_size
    summary = SummaryHead(hidden, args.summary_layer).to(device) if args.summary_layer else None
    opt = make_optimizer(torch.nn.ModuleList([model, heads, summary or torch.nn.Module()]),
                         args.lr)
    total, log, t0, t_cal = args.steps, [], time.time(), 0.0
    model.train()
    for step, batch in enumerate(loader):
        if total and step >= total:
            break
        if args.stop_after and step >= args.stop_after:  # replays a run the guard below cut
            total = step
            break
        if args.max_seconds and time.time() - t0 > args.max_seconds:
            print(f"wall-clock guard: stopped at step {step} of {total}", flush=True)
            total = step
            break
        if not total and step == 10:
            t_cal = time.time()
        if not total and step == 10 + args.calibrate:
            per_step = (time.time() - t_cal) / args.calibrate
            total = max(step + 1, int((args.time_budget - (time.time() - t0)) / per_step) + step)
            print(f"calibrated: {per_step * 1e3:.1f} ms/step -> {total} steps", flush=True)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total or args.warmup * 10, args.lr, args.warmup)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            lm, aux, scene = loss_of(model, heads, batch, pixel_dtype, aux_weight,
                                     summary=summary)
        loss = lm + aux_weight * aux + args.summary_weight * scene
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.log_every == 0:
            entry = {"step": step, "loss": round(lm.item(), 4), "aux": round(aux.item(), 4),
                     "summary": round(scene.item(), 4),
                     "object_acc": [round(a, 3) for a in getattr(heads, "object_accuracy", [])],
                     "s": round(time.time() - t0, 1)}
            log.append(entry)
            print(json.dumps(entry), flush=True)
    return {"steps": total, "seconds": round(time.time() - t0, 1), "log": log}


def load_original_weights(model: torch.nn.Module, model_dir: Path) -> None:
    """Load a saved model into ``model``. A language model deeper than the saved one keeps the
    saved layers and starts each extra layer as the identity (its output projections zeroed), so
    growing the model keeps what it has learnt."""
    from safetensors.torch import load_file

    state = original_to_hf(load_file(str(model_dir / "model.safetensors")))
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()},
                                                strict=False)
    new_layer = re.compile(r"^model\.language_model\.layers\.(\d+)\.")
    if unexpected or any(not new_layer.match(k) for k in missing):
        raise ValueError(f"{model_dir} does not fit: missing {missing}, unexpected {unexpected}")
    layers = model.model.language_model.layers
    for index in sorted({int(new_layer.match(k)[1]) for k in missing}):
        with torch.no_grad():
            layers[index].self_attn.o_proj.weight.zero_()
            layers[index].mlp.down_proj.weight.zero_()
        print(f"language-model layer {index} added as the identity", flush=True)


def save_weights(model: torch.nn.Module, out: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu", torch.bfloat16).contiguous()
             for k, v in model.state_dict().items()}
    original = hf_to_original(state)
    save_file(dict(sorted(original.items())), str(out / "model.safetensors"),
              metadata={"format": "pt"})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=0, help="0: choose from --time-budget")
    p.add_argument("--time-budget", type=float, default=300.0, help="seconds of training")
    p.add_argument("--calibrate", type=int, default=100)
    p.add_argument("--max-seconds", type=float, default=0.0, help="hard stop (0: none)")
    p.add_argument("--stop-after", type=int, default=0,
                   help="stop after this many steps of the --steps schedule (0: none)")
    p.add_argument("--batch-size", type=int, default=32, help="samples (images) per step")
    p.add_argument("--questions-per-scene", type=int, default=1,
                   help="questions trained per sample image (one vision pass for all)")
    p.add_argument("--text-layers", type=int, default=TEXT["num_hidden_layers"],
                   help="language-model depth (extra layers over --init-from start as identity)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--eval-n", type=int, default=300)
    p.add_argument("--aux", choices=("none", "tokens", "scene"), default="scene",
                   help="dense image-token targets: none; the object under each token; that and "
                        "the whole scene on whole-image tiles")
    p.add_argument("--local-targets", choices=("objects", "all-tokens"), default="objects",
                   help="objects: object-vs-background on every token, shape/colour/slot on "
                        "object tokens, slot only on whole-image tiles; all-tokens: each column "
                        "on every token, slot on crops too (how stages 1-3 were trained)")
    p.add_argument("--summary-layer", type=int, default=0,
                   help="train the language model's state at each </img> after this many layers "
                        "to hold the image's slot contents (0: off)")
    p.add_argument("--summary-weight", type=float, default=1.0)
    p.add_argument("--aux-weight", type=float, default=1.0, help="dense image-token loss weight")
    p.add_argument("--init-from", type=Path, help="start from this saved model's weights")
    p.add_argument("--data-offset", type=int, default=0, help="index of the first question")
    p.add_argument("--plain-share", type=float, default=0.0,
                   help="share of prompts lower-cased without final period")
    p.add_argument("--absent-share", type=float, default=0.0,
                   help="share of single-image count questions turned to an absent shape ('0')")
    p.add_argument("--kind-weights", default="",
                   help="training mix, e.g. 'multi_turn=0.3,count=0.2' (others keep theirs)")
    p.add_argument("--log-every", type=int, default=50)
    args = p.parse_args()
    if args.steps == 0 and args.warmup < 10 + args.calibrate:
        p.error("--warmup must cover the calibration steps")
    try:
        KIND_WEIGHTS.update(parse_kind_weights(args.kind_weights))  # before the workers fork
    except ValueError as exc:
        p.error(str(exc))

    from transformers import AutoTokenizer

    TEXT["num_hidden_layers"] = args.text_layers
    args.out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(build_tokenizer(), args.out)
    tokenizer = AutoTokenizer.from_pretrained(str(args.out))
    vocab = 64 * math.ceil(len(tokenizer) / 64)
    config = original_config(vocab, tokenizer.eos_token_id, tokenizer.pad_token_id)
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {"bos_token_id": tokenizer.pad_token_id,
           "eos_token_id": [tokenizer.eos_token_id, tokenizer.pad_token_id],
           "pad_token_id": tokenizer.pad_token_id}
    (args.out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")

    torch.manual_seed(args.seed)
    model = build_hf_model(config, tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"))
    if args.init_from:
        load_original_weights(model, args.init_from)
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M", flush=True)
    result = train(args, model.to(args.device), tokenizer)
    save_weights(model, args.out)

    answerer = ReferenceAnswerer(args.out, device=args.device)
    t = time.time()
    report = evaluate(answerer, generate_questions(EVAL_SEED, args.eval_n))
    print(report.summary(), flush=True)
    result["eval"] = {"seed": EVAL_SEED, "n": report.n, "seconds": round(time.time() - t, 1),
                      "overall": report.accuracy(),
                      **{k: report.accuracy(k) for k in KINDS if k in report.total}}
    result["args"] = {k: str(v) for k, v in vars(args).items()}
    result["failures"] = [(q.kind, q.answer, pred) for q, pred in report.failures[:40]]
    (args.out / "train_log.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
