"""The vocabulary split across tensor-parallel ranks: token embedding and lm_head.

Rank ``r`` holds vocabulary rows ``[r * V', (r + 1) * V')`` with ``V' = ceil(V / tp)``; the rows
past ``V`` on the last ranks are padding (zeros from the loader). The embedding and the lm_head
split alike, so tied weights are tied shard by shard. The embedding looks up the ids it holds,
gives zero rows for the others and all-reduces; the lm_head computes this rank's logits and
all-gathers them, so every rank gets the full ``(T, V)`` logits (the engine passes only the rows
it samples). At ``tp_size() == 1`` both are the plain ``nn`` modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmdeploy.distributed.state import all_gather, all_reduce, tp_rank, tp_size
from vlmdeploy.layers.linear import Shard, ShardLayout


def vocab_shard(vocab_size: int) -> tuple[Shard, int]:
    """This rank's vocabulary rows, and how many rows it holds with padding (``ceil(V / tp)``)."""
    rows = -(-vocab_size // tp_size())
    start = min(tp_rank() * rows, vocab_size)
    return Shard(vocab_size, start, min(rows, vocab_size - start)), rows


class VocabParallelEmbedding(nn.Embedding):
    def __init__(self, vocab_size: int, embedding_dim: int):
        shard, rows = vocab_shard(vocab_size)
        super().__init__(rows, embedding_dim)
        self.tp_size, self.vocab_start = tp_size(), shard.start
        self.shard_layouts = {"weight": ShardLayout(0, (shard,))}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return super().forward(ids)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)  # another rank's ids
        x = F.embedding(local.masked_fill(outside, 0), self.weight)  # (T, H)
        return all_reduce(x.masked_fill_(outside[..., None], 0))


class ParallelLMHead(nn.Linear):
    """``hidden @ Wᵀ`` over the vocabulary split like :class:`VocabParallelEmbedding`;
    ``forward`` returns the full logits on every rank."""

    def __init__(self, vocab_size: int, hidden_size: int):
        shard, rows = vocab_shard(vocab_size)
        super().__init__(hidden_size, rows, bias=False)
        self.tp_size, self.vocab_size = tp_size(), vocab_size
        self.shard_layouts = {"weight": ShardLayout(0, (shard,))}

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.gather(super().forward(hidden))

    def gather(self, logits: torch.Tensor) -> torch.Tensor:
        """This rank's logits (T, V') → every rank's, (T, V), padding trimmed."""
        if self.tp_size == 1:
            return logits
        full = all_gather(logits, dim=-1)  # (T, tp * V')
        if full.shape[-1] == self.vocab_size:
            return full
        return full[..., : self.vocab_size].contiguous()
