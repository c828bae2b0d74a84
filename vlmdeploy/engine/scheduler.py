"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Each step schedules, in order: (1) every running sequence that is decoding (one token each), (2) the
next chunk of every running sequence still in prefill, (3) waiting sequences, admitted while the
batch has room (``max_batch_size``), the per-step prefill budget (``max_prefill_token_num``) is not
spent and the free KV blocks cover the whole prompt. Decode goes first so that arriving prompts
never stall running generations; long prompts are split into chunks that share steps with decodes.
When a running sequence needs a block and none is free, the most recently admitted other sequence is
preempted: its blocks are freed and it goes back to the front of the queue to be recomputed later
(its generated tokens are kept, so the result is the same).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from vlmdeploy.engine.block_manager import BlockManager
from vlmdeploy.engine.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # new tokens computed for each sequence

    def add(self, seq: Sequence, n: int) -> None:
        self.seqs.append(seq)
        self.num_tokens.append(n)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_batch_size: int, max_prefill_tokens: int):
        self.blocks = block_manager
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        decoding, prefilling = [], []
        for s in self.running:
            left = s.num_uncomputed
            if left == 1:
                decoding.append(s)
            elif left > 1:
                prefilling.append(s)
        for seq in decoding:
            if seq.status == Status.RUNNING and self._reserve(seq, 1, batch):
                batch.add(seq, 1)
        budget = self.max_prefill_tokens
        for seq in prefilling:
            if budget <= 0 or seq.status != Status.RUNNING:
                break
            n = min(seq.num_uncomputed, budget)
            if self._reserve(seq, n, batch):
                batch.add(seq, n)
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            if seq.num_pending:  # preempted with its last token unread: admitted once it is known
                break
            cached = self.blocks.match_prefix(seq)
            if self.blocks.blocks_needed(seq, seq.num_uncomputed) > self.blocks.num_free:
                self.blocks.free_seq(seq)  # the whole prompt must fit; hand cached blocks back
                break
            if seq.num_output == 0:
                seq.num_cached = cached
            self.waiting.popleft()
            n = min(seq.num_uncomputed, budget)
            self.blocks.allocate(seq, n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.add(seq, n)
            budget -= n
        return batch

    def _reserve(self, seq: Sequence, n: int, batch: ScheduledBatch) -> bool:
        """Give ``seq`` blocks for ``n`` more tokens, preempting the newest sequence not yet in this
        step's batch if needed. A decoding sequence with nobody left to preempt is preempted itself;
        a prefilling one keeps what it has and waits a step."""
        if self.blocks.blocks_needed(seq, n) == 0:  # most decode steps: the last block has room
            return True
        while not self.blocks.can_allocate(seq, n):
            victim = next(
                (s for s in reversed(self.running) if s is not seq and s not in batch.seqs), None
            )
            if victim is None:
                if n == 1:
                    self.preempt(seq)
                return False
            self.preempt(victim)
        self.blocks.allocate(seq, n)
        return True

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free_seq(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str, free: bool = True) -> None:
        """Remove ``seq`` from the engine (finished or aborted) and free its blocks (unless
        ``free`` is False: the caller frees them once the step writing their last KV is read)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if free:
            self.blocks.free_seq(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
