"""Padded decode batches (the CUDA-graph path) give exactly the tokens of the eager path.

On the CPU the graph runner replays its static buffers eagerly, so this pins the padding,
scratch-block and bucket logic; capture itself is exercised by the GPU tests."""

from __future__ import annotations

import math

from vlmdeploy import GenerationConfig, PytorchEngineConfig, pipeline
from vlmdeploy.engine.graphs.decode import DecodeGraphs, bucket_sizes


def test_buckets_cover_every_batch_size():
    sizes = bucket_sizes(40)
    assert sizes == [1, 2, 4, 8, 16, 32, 40]
    assert all(any(b >= n for b in sizes) for n in range(1, 41))


def test_padded_decode_matches_eager(tiny_ckpts, images):
    # different lengths: the batch shrinks 5 → 1 and rows that held live sequences become padding
    gen = [GenerationConfig(max_new_tokens=n, min_new_tokens=n) for n in (12, 4, 8, 2, 6)]
    prompts = ["hi", ("describe", images[0]), "a longer prompt " * 9, "x", "y z"]  # 5 → bucket 8
    cfg = PytorchEngineConfig(session_len=2048, block_size=16, max_batch_size=8)
    with pipeline(tiny_ckpts["original"], cfg) as pipe:
        eager = [r.token_ids for r in pipe(prompts, gen_config=gen)]
        runner = pipe.engine.core.runner
        graphs = DecodeGraphs(
            runner.model,
            8,
            math.ceil(2048 / 16),
            runner.scratch_block,
            16,
            2048,
            runner.device,
            capture=False,
        )
        calls = []
        run = graphs.replay
        graphs.replay = lambda inputs: calls.append(len(inputs.ids)) or run(inputs)
        runner.decode_graphs = graphs
        padded = [r.token_ids for r in pipe(prompts, gen_config=gen)]
        single = pipe("x", gen_config=gen[3]).token_ids  # a batch of one after batches of five
    assert padded == eager
    assert single == eager[3]
    # prompts reach the engine as they are preprocessed, so batch sizes vary; some are padded
    assert any(n not in graphs.buckets for n in calls)


def test_capture_sizes_can_be_chosen():
    assert bucket_sizes(64, [3, 1, 200, 24]) == [1, 3, 24, 64]
