"""Scheduler and block-manager invariants, driven by a fake model on the CPU.

The fake model's next token is a hash of the whole token prefix, so a sequence's output depends only
on its own tokens: any difference between a run with preemption and one without is a scheduling bug.
"""

from __future__ import annotations

import random
import zlib

import pytest

from vlmdeploy.engine.block_manager import BlockManager
from vlmdeploy.engine.sampling import SamplingParams
from vlmdeploy.engine.scheduler import Scheduler
from vlmdeploy.engine.sequence import Sequence, Status

BS = 4


def fake_next_token(tokens: list[int]) -> int:
    return zlib.crc32(bytes(str(tokens), "ascii")) % 1000


def check_invariants(sched: Scheduler) -> None:
    owned = [b for s in sched.running for b in s.block_table]
    assert len(owned) == len(set(owned)), "a block is owned twice"
    assert not set(owned) & set(sched.blocks.free), "a block is both free and owned"
    assert len(owned) + sched.blocks.num_free == sched.blocks.num_blocks, "a block leaked"
    for s in sched.waiting:
        assert s.block_table == [] and s.num_computed == 0


def run(
    prompts: list[list[int]],
    max_new: list[int],
    num_blocks: int,
    max_batch: int = 8,
    budget: int = 16,
    abort_at: dict[int, int] | None = None,
) -> tuple[dict[int, list[int]], int]:
    blocks = BlockManager(num_blocks, BS)
    sched = Scheduler(blocks, max_batch, budget)
    seqs = [
        Sequence(i, list(p), SamplingParams(max_new_tokens=m))
        for i, (p, m) in enumerate(zip(prompts, max_new))
    ]
    for s in seqs:
        sched.add(s)
    step = 0
    while sched.has_work():
        step += 1
        assert step < 10_000, "no progress"
        for seq_id, at in (abort_at or {}).items():
            if at == step and not seqs[seq_id].is_finished:
                sched.finish(seqs[seq_id], "abort")
        batch = sched.schedule()
        check_invariants(sched)
        assert len(batch.seqs) == len({id(s) for s in batch.seqs})
        for seq, n in zip(batch.seqs, batch.num_tokens):
            assert seq.status == Status.RUNNING
            assert len(seq.block_table) * BS >= seq.num_computed + n, "KV slots missing"
            seq.num_computed += n
            if seq.num_computed == len(seq):
                seq.token_ids.append(fake_next_token(seq.token_ids))
                if seq.num_output >= seq.sampling.max_new_tokens:
                    sched.finish(seq, "length")
        check_invariants(sched)
    assert blocks.num_free == num_blocks
    return {s.seq_id: s.output_ids for s in seqs}, sched.num_preemptions


@pytest.mark.parametrize("seed", range(5))
def test_preempted_requests_finish_with_the_same_tokens(seed):
    rng = random.Random(seed)
    prompts = [[rng.randrange(1000) for _ in range(rng.randint(1, 30))] for _ in range(12)]
    max_new = [rng.randint(1, 25) for _ in prompts]
    roomy, pre_roomy = run(prompts, max_new, num_blocks=1000)
    tight, pre_tight = run(prompts, max_new, num_blocks=14)
    assert pre_roomy == 0 and pre_tight > 0
    assert tight == roomy
    for i, out in roomy.items():
        assert len(out) == max_new[i]


def test_aborts_free_blocks_and_spare_the_others():
    rng = random.Random(7)
    prompts = [[rng.randrange(1000) for _ in range(rng.randint(5, 20))] for _ in range(8)]
    max_new = [20] * 8
    full, _ = run(prompts, max_new, num_blocks=40)
    aborted, _ = run(prompts, max_new, num_blocks=40, abort_at={1: 3, 4: 1, 6: 12})
    for i in (0, 2, 3, 5, 7):
        assert aborted[i] == full[i]
    assert len(aborted[4]) == 0


def test_max_batch_size_and_prefill_budget_bound_each_step():
    blocks = BlockManager(1000, BS)
    sched = Scheduler(blocks, max_batch_size=3, max_prefill_tokens=10)
    for i in range(6):
        sched.add(Sequence(i, list(range(25)), SamplingParams(max_new_tokens=4)))
    batch = sched.schedule()
    assert len(sched.running) <= 3
    assert sum(batch.num_tokens) <= 10  # no decodes yet: everything is prefill
    assert batch.num_tokens == [10]  # the first prompt is chunked; nothing else fits the budget


def test_decodes_are_scheduled_before_prefill_chunks():
    blocks = BlockManager(1000, BS)
    sched = Scheduler(blocks, max_batch_size=8, max_prefill_tokens=8)
    first = Sequence(0, [1, 2, 3], SamplingParams(max_new_tokens=50))
    sched.add(first)
    batch = sched.schedule()
    first.num_computed += batch.num_tokens[0]
    first.token_ids.append(5)
    sched.add(Sequence(1, list(range(100)), SamplingParams(max_new_tokens=5)))
    batch = sched.schedule()
    assert batch.seqs[0] is first and batch.num_tokens[0] == 1
    assert batch.num_tokens[1] == 8
