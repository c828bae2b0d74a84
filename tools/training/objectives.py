"""What training minimises: the answer-token loss and the training-only image-token objectives.

Contract: ``loss_of(model, heads, batch, ...)`` returns three scalar losses of a batch from
``batches.collate``: the mean cross-entropy over assistant tokens, the dense image-token loss of
``AuxHeads`` (``--aux tokens|scene``; zero with ``--aux none``), and the ``</img>`` summary loss
of ``SummaryHead`` (``--summary-layer``); ``loop.train`` weighs and sums them. The heads exist
only during training: they shape what the vision tower and the language model learn, and are
neither part of the model nor saved with it. ``image_features`` runs the modules of transformers'
own ``get_image_features`` in its order, so training sees the image features inference computes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vlmdeploy.synthetic.scene import COLOURS, SHAPES, SLOTS

from .batches import normalise


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
