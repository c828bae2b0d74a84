"""Owns the model and the KV cache; turns a scheduled batch into one forward pass and returns
logits.

Inputs are packed: the new tokens of every sequence in the batch are concatenated (T tokens),
positions are their absolute positions, and the attention metadata tells each layer where to store
and read KV. Image context tokens take their embeddings from the sequence's ``image_embeds``
(computed by the vision stage), indexed by how many image tokens precede the chunk, so a prefill
chunk may start or end inside an image.
"""

from __future__ import annotations

import torch

from vlmdeploy.config import ModelConfig
from vlmdeploy.engine.cuda_graph import DecodeGraphs
from vlmdeploy.engine.prefill_graphs import PrefillGraphs
from vlmdeploy.engine.scheduler import ScheduledBatch
from vlmdeploy.engine.sequence import Sequence
from vlmdeploy.engine.transfer import h2d, substitute
from vlmdeploy.engine.vision_graphs import VisionGraphs
from vlmdeploy.layers.attention import AttentionMetadata, PagedAttention, attention_context
from vlmdeploy.models.internvl import InternVLForCausalLM
from vlmdeploy.vl.tiling import normalize_raw


class ModelRunner:
    def __init__(
        self,
        model: InternVLForCausalLM,
        cfg: ModelConfig,
        image_token_id: int,
        num_blocks: int,
        block_size: int,
        kv_dtype: torch.dtype,
        device: torch.device,
    ):
        self.model, self.cfg, self.device = model, cfg, device
        self.image_token_id = image_token_id
        self.block_size = block_size
        t = cfg.text
        # (2, layers, blocks + 1, block_size, kv_heads, head_dim); each layer gets views of its
        # slices. The extra block (index num_blocks) is scratch space for padded CUDA-graph rows.
        self.scratch_block = num_blocks
        self.kv_cache = torch.zeros(
            2,
            t.num_layers,
            num_blocks + 1,
            block_size,
            t.num_kv_heads,
            t.head_dim,
            dtype=kv_dtype,
            device=device,
        )
        self.graphs: DecodeGraphs | None = None  # set by the engine when CUDA graphs are on
        self.prefill_graphs: PrefillGraphs | None = None  # likewise
        self.vision_graphs: VisionGraphs | None = None  # likewise
        self.bind_cache()

    def bind_cache(self) -> None:
        """Give every attention layer its views of the KV cache."""
        layers = [m for m in self.model.modules() if isinstance(m, PagedAttention)]
        for i, layer in enumerate(layers):
            layer.k_cache, layer.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]

    @torch.inference_mode()
    def encode_images(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 (tiles, 448, 448, 3), normalised here on the device, or normalised float32
        (tiles, 3, 448, 448) → (tiles, 256, H). Raw tiles of a count with a CUDA graph replay it."""
        if tiles.dtype == torch.uint8:  # a quarter of the bytes to copy; no host-side float pass
            if self.vision_graphs is not None:
                out = self.vision_graphs.run(tiles)
                if out is not None:
                    return out
            return self.encode_raw(h2d(tiles, torch.uint8, self.device))
        dtype = next(self.model.vision_model.parameters()).dtype
        return self.model.encode_images(tiles.to(self.device).to(dtype))

    @torch.inference_mode()
    def encode_raw(self, tiles: torch.Tensor) -> torch.Tensor:
        """Raw uint8 tiles already on the device → (tiles, 256, H)."""
        dtype = next(self.model.vision_model.parameters()).dtype
        return self.model.encode_images(normalize_raw(tiles).to(dtype))

    @torch.inference_mode()
    def run(
        self,
        batch: ScheduledBatch,
        sample_rows: list[int],
        prev_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """One forward over the batch; returns logits (len(sample_rows), V) for the last new token
        of the sequences at ``sample_rows``. A sequence whose last token is still pending takes it
        from row ``seq.pending_row`` of ``prev_tokens``, the previous step's sampled tokens, on the
        device: the host never waits for them."""
        ids, positions, slots, embeds, masks = [], [], [], [], []
        cu, kv_lens, subst_dst, subst_src = [0], [], [], []
        for seq, n in zip(batch.seqs, batch.num_tokens):
            start, end = seq.num_computed, seq.num_computed + n
            chunk = seq.token_ids[start:end]
            if seq.num_pending and end == len(seq):
                if seq.num_pending > 1 or prev_tokens is None:
                    raise RuntimeError("a step needs a token that is not on the device")
                subst_dst.append(len(ids) + n - 1)
                subst_src.append(seq.pending_row)
            ids.extend(chunk)
            positions.extend(range(start, end))
            slots.extend(_slots(seq, start, end, self.block_size))
            emb, mask = self._image_rows(seq, start, chunk)
            embeds.append(emb)
            masks.append(mask)
            cu.append(cu[-1] + n)
            kv_lens.append(end)
        subst = (subst_dst, subst_src, prev_tokens) if subst_dst else None
        has_images = any(e is not None for e in embeds)
        tables = [s.block_table for s in batch.seqs]
        if (
            self.graphs is not None
            and not has_images
            and len(ids) == len(batch.seqs)
            and self.graphs.can_run(len(ids), max(map(len, tables)))
        ):
            logits = self.graphs.run(ids, positions, slots, kv_lens, tables, subst)  # (n, V)
            if not sample_rows:
                return None
            if len(sample_rows) == len(ids):
                return logits
            return logits[h2d(sample_rows, torch.long, self.device)]
        pg = self.prefill_graphs
        if (
            pg is not None
            and len(tables) == 1
            and subst is None
            and pg.can_run(len(ids), len(tables[0]))
        ):
            image = embeds[0].to(self.device) if embeds[0] is not None else None
            logits = pg.run(ids, positions, slots, kv_lens[0], tables[0], image, masks[0])
            return logits if sample_rows else None
        hidden = self._forward(
            ids, positions, slots, cu, kv_lens, tables, embeds, masks, max(batch.num_tokens), subst
        )
        if not sample_rows:
            return None
        last = [cu[i + 1] - 1 for i in sample_rows]
        if last == list(range(len(hidden))):  # a pure decode step: every row, in order
            return self.model.compute_logits(hidden)
        return self.model.compute_logits(hidden[h2d(last, torch.long, self.device)])

    def _forward(
        self, ids, positions, slots, cu, kv_lens, tables, embeds, masks, max_q_len: int, subst
    ) -> torch.Tensor:
        """Eager forward of a packed batch → hidden states (T, H)."""
        dev = self.device
        image_embeds = [e for e in embeds if e is not None]
        mask = image = None
        if image_embeds:
            mask = torch.cat(
                [
                    m if m is not None else torch.zeros(len(c), dtype=torch.bool)
                    for m, c in zip(masks, _spans(cu))
                ]
            )
            mask = h2d(mask, torch.bool, dev)
            image = torch.cat(image_embeds).to(dev)
        input_ids = h2d(ids, torch.long, dev)
        substitute(input_ids, subst)
        x = self.model.embed(input_ids, image, mask)
        width = max(map(len, tables))
        meta = AttentionMetadata(
            slot_mapping=h2d(slots, torch.long, dev),
            cu_seqlens_q=h2d(cu, torch.int32, dev),
            kv_lens=h2d(kv_lens, torch.int32, dev),
            block_tables=h2d([t + [-1] * (width - len(t)) for t in tables], torch.int32, dev),
            max_q_len=max_q_len,
            max_kv_len=max(kv_lens),
            num_decode=_leading_ones(cu),
        )
        with attention_context(meta):
            return self.model(x, h2d(positions, torch.long, dev))

    def _image_rows(self, seq: Sequence, start: int, chunk: list[int]):
        """Image embeddings for the image tokens inside ``chunk`` and the chunk's image-token
        mask (None when the chunk holds no image token)."""
        # Only prompt positions hold images: a generated <IMG_CONTEXT> id is an ordinary token.
        limit = seq.num_prompt_tokens if seq.images else 0
        if seq.image_embeds is None or start >= limit:
            return None, None
        mask = torch.tensor(
            [t == self.image_token_id and start + i < limit for i, t in enumerate(chunk)],
            dtype=torch.bool,
        )
        if not bool(mask.any()):
            return None, None
        before = sum(1 for t in seq.token_ids[: min(start, limit)] if t == self.image_token_id)
        return seq.image_embeds[before : before + int(mask.sum())], mask


def _leading_ones(cu: list[int]) -> int:
    """How many sequences at the head of the batch have exactly one new token."""
    n = 0
    while n + 1 < len(cu) and cu[n + 1] - cu[n] == 1:
        n += 1
    return n


def _spans(cu: list[int]) -> list[range]:
    return [range(a, b) for a, b in zip(cu, cu[1:])]


def _slots(seq: Sequence, start: int, end: int, block_size: int) -> list[int]:
    table = seq.block_table
    return [table[p // block_size] * block_size + p % block_size for p in range(start, end)]
