"""Training samples and batches: what the data loader yields and how samples are stacked.

Contract: ``TrainSet(tokenizer, length, offset, ...)[i]`` is a pure function of ``i + offset``
(through ``stream.sample_questions``), so any number of loader workers yields the same batches.
A sample is one image set with one or more questions about it: the token ids and labels of each
question (the prompt rendered by ``reference.render_prompt``, exactly as the engine renders it),
the uint8 tiles of the image(s) once, and dense targets for every image token. ``collate`` stacks
samples into right-padded sequences and records which tiles each sequence shows, so the loss
runs the vision tower once per tile however many questions share it. Pixels stay uint8 until
``normalise`` runs on the training device: it spares the loader workers' CPUs and the transfer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from vlmdeploy.synthetic.reference import render_prompt
from vlmdeploy.synthetic.scene import COLOURS, SHAPES, SLOTS, Scene, render_labels
from vlmdeploy.vl.tiling import IMAGENET_MEAN, IMAGENET_STD, target_grid, tile_array

from .model_files import MAX_DYNAMIC_PATCH
from .stream import prompt_form, sample_questions


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
