"""Paged KV-cache bookkeeping: fixed-size blocks, each sequence's block table, and the prefix cache.

Every block has a reference count. Without prefix caching a block is owned by at most one sequence.
With it, a *full* block whose KV has been computed is registered under a hash chained over
everything that determines its KV — the previous block's hash, its token ids and the content hashes
of the images whose tokens it holds (all ``<IMG_CONTEXT>`` ids look alike, so the ids alone would
alias different images). A new sequence reuses the longest run of registered blocks matching its
prompt; a registered block whose count drops to zero stays cached (least recently freed evicted
first) until its memory is needed.

Invariants (checked by tests): owned blocks are never in the free pool; ``num_free`` counts free and
evictable blocks; finishing, aborting or preempting a sequence releases all of its references; a
block is only ever written by the one sequence that computes it (matched blocks are full and
read-only).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque

from vlmdeploy.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        if num_blocks <= 0:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = enable_prefix_caching
        self.free: deque[int] = deque(range(num_blocks))
        self.ref = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash → block holding that content
        self.evictable: OrderedDict[int, None] = (
            OrderedDict()
        )  # cached blocks nobody uses, LRU first

    @property
    def num_free(self) -> int:
        return len(self.free) + len(self.evictable)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    # ---- allocation ----------------------------------------------------------------------------
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
        seq.block_table.extend(self._pop_free() for _ in range(n))

    def _pop_free(self) -> int:
        if self.free:
            block = self.free.popleft()
        else:  # reuse the least recently freed cached block; its content is forgotten
            block, _ = self.evictable.popitem(last=False)
            del self.cached[self.block_hash[block]]
            self.block_hash[block] = None
        self.ref[block] = 1
        return block

    def free_seq(self, seq: Sequence) -> None:
        """Release all of ``seq``'s blocks; its KV must be recomputed if it runs again."""
        for block in reversed(seq.block_table):  # tail first: the prefix stays cached longest
            self.ref[block] -= 1
            if self.ref[block] == 0:
                if self.block_hash[block] is not None:
                    self.evictable[block] = None
                else:
                    self.free.append(block)
        seq.block_table = []
        seq.num_computed = 0
        seq.num_committed = 0

    # ---- prefix cache --------------------------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> int:
        """Give a sequence with no KV the cached blocks of its longest registered prefix; returns
        the number of tokens they cover. At least one token is always left to compute (for its
        logits)."""
        if not self.prefix_caching or seq.block_table:
            return 0
        for i in range((len(seq) - 1) // self.block_size):
            block = self.cached.get(self.hash_of(seq, i))
            if block is None:
                break
            if self.ref[block] == 0:
                del self.evictable[block]
            self.ref[block] += 1
            seq.block_table.append(block)
        seq.num_computed = len(seq.block_table) * self.block_size
        return seq.num_computed

    def commit(self, seq: Sequence) -> None:
        """Register the blocks of ``seq`` that became full with computed KV in the last step."""
        if not self.prefix_caching:
            return
        # A block ending in a token still on its way from the device waits for a later step.
        full = min(seq.num_computed, seq.num_known) // self.block_size
        for i in range(seq.num_committed, full):
            block, h = seq.block_table[i], self.hash_of(seq, i)
            if h not in self.cached and self.block_hash[block] is None:
                self.cached[h] = block
                self.block_hash[block] = h
        seq.num_committed = max(seq.num_committed, full)

    def hash_of(self, seq: Sequence, i: int) -> bytes:
        """Hash of full block ``i`` of ``seq``, chained over the blocks before it (memoised)."""
        while len(seq.block_hashes) <= i:
            j = len(seq.block_hashes)
            start, end = j * self.block_size, (j + 1) * self.block_size
            h = hashlib.blake2b(seq.block_hashes[-1] if j else b"", digest_size=16)
            h.update(",".join(map(str, seq.token_ids[start:end])).encode())
            for im in seq.images:
                if im.offset < end and im.offset + im.num_tokens > start:
                    h.update(im.content_hash.encode())
            seq.block_hashes.append(h.digest())
        return seq.block_hashes[i]
