"""One step's work for the model, packed: the new tokens of every scheduled sequence concatenated
(T tokens), with where each is stored in the KV cache and which rows take image embeddings.

Every way of running a step — a decode graph, a prefill graph, the eager forward — takes this one
shape. It is host data (lists) until a path copies it to the device; only the previous step's
tokens (``pending``) are already there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmdeploy.engine.scheduler import ScheduledBatch
from vlmdeploy.engine.sequence import Sequence


@dataclass
class StepInputs:
    ids: list[int]  # (T,) new token ids; a pending token's row holds PENDING until substituted
    positions: list[int]  # (T,) absolute positions
    slots: list[int]  # (T,) KV-cache slot of each new token
    cu_seqlens: list[int]  # (B + 1,) start of each sequence's new tokens
    kv_lens: list[int]  # (B,) context length of each sequence after this step
    block_tables: list[list[int]]  # (B, ragged)
    image_embeds: list[torch.Tensor | None]  # per sequence: rows for its image tokens, in order
    image_masks: list[torch.Tensor | None]  # per sequence: host bool (its T,) image-token rows
    # Pending tokens: (rows of ids, rows of the previous step's tokens, those tokens on the
    # device), or None (see vlmdeploy.engine.transfer.substitute).
    pending: tuple[list[int], list[int], torch.Tensor] | None
    sample_rows: list[int]  # sequences whose last new token is sampled

    @property
    def num_seqs(self) -> int:
        return len(self.kv_lens)

    @property
    def max_q_len(self) -> int:
        return max(b - a for a, b in zip(self.cu_seqlens, self.cu_seqlens[1:]))

    @property
    def is_decode(self) -> bool:
        """One new token per sequence and no image rows."""
        return len(self.ids) == self.num_seqs and not self.has_images

    @property
    def has_images(self) -> bool:
        return any(e is not None for e in self.image_embeds)

    @property
    def last_rows(self) -> list[int]:
        """Packed rows of the sampled tokens."""
        return [self.cu_seqlens[i + 1] - 1 for i in self.sample_rows]

    @property
    def num_decode(self) -> int:
        """How many sequences at the head of the batch have exactly one new token."""
        cu, n = self.cu_seqlens, 0
        while n + 1 < len(cu) and cu[n + 1] - cu[n] == 1:
            n += 1
        return n


def pack(
    batch: ScheduledBatch,
    sample_rows: list[int],
    prev_tokens: torch.Tensor | None,
    block_size: int,
    image_token_id: int,
) -> StepInputs:
    """A sequence whose last token is still pending takes it from row ``seq.pending_row`` of
    ``prev_tokens``, the previous step's sampled tokens, on the device: the host never waits for
    them."""
    ids, positions, slots, embeds, masks = [], [], [], [], []
    cu, kv_lens, dst, src = [0], [], [], []
    for seq, n in zip(batch.seqs, batch.num_tokens):
        start, end = seq.num_computed, seq.num_computed + n
        chunk = seq.token_ids[start:end]
        if seq.num_pending and end == len(seq):
            if seq.num_pending > 1 or prev_tokens is None:
                raise RuntimeError("a step needs a token that is not on the device")
            dst.append(len(ids) + n - 1)
            src.append(seq.pending_row)
        ids.extend(chunk)
        positions.extend(range(start, end))
        slots.extend(_slots(seq.block_table, start, end, block_size))
        emb, mask = _image_rows(seq, start, chunk, image_token_id)
        embeds.append(emb)
        masks.append(mask)
        cu.append(cu[-1] + n)
        kv_lens.append(end)
    pending = (dst, src, prev_tokens) if dst else None
    tables = [s.block_table for s in batch.seqs]
    return StepInputs(
        ids, positions, slots, cu, kv_lens, tables, embeds, masks, pending, sample_rows
    )


def _slots(table: list[int], start: int, end: int, block_size: int) -> list[int]:
    return [table[p // block_size] * block_size + p % block_size for p in range(start, end)]


def _image_rows(seq: Sequence, start: int, chunk: list[int], image_token_id: int):
    """Image embeddings for the image tokens inside ``chunk`` and the chunk's image-token mask
    (None, None when the chunk holds no image token). A prefill chunk may start or end inside an
    image: its rows are found by counting the image tokens before the chunk."""
    # Only prompt positions hold images: a generated <IMG_CONTEXT> id is an ordinary token.
    limit = seq.num_prompt_tokens if seq.images else 0
    if seq.image_embeds is None or start >= limit:
        return None, None
    mask = torch.tensor(
        [t == image_token_id and start + i < limit for i, t in enumerate(chunk)],
        dtype=torch.bool,
    )
    if not bool(mask.any()):
        return None, None
    before = sum(1 for t in seq.token_ids[: min(start, limit)] if t == image_token_id)
    return seq.image_embeds[before : before + int(mask.sum())], mask
