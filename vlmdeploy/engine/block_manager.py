"""Paged KV-cache bookkeeping: a free list of fixed-size blocks and each sequence's block table.

Invariants (checked by tests): a block is either free or owned by exactly one running sequence; a
sequence owns exactly ``ceil(tokens with KV / block_size)`` blocks; finishing, aborting or
preempting a sequence returns all of its blocks.
"""

from __future__ import annotations

from collections import deque

from vlmdeploy.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks ``seq`` needs to hold KV for ``num_tokens`` more tokens."""
        total = seq.num_computed + num_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_free

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        n = self.blocks_needed(seq, num_tokens)
        if n > self.num_free:
            raise RuntimeError("allocate() without can_allocate()")
        seq.block_table.extend(self.free.popleft() for _ in range(n))

    def free_seq(self, seq: Sequence) -> None:
        self.free.extend(seq.block_table)
        seq.block_table = []
        seq.num_computed = 0
