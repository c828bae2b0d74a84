"""Padded single-sequence prefill steps (the prefill CUDA-graph path) give the tokens of the eager
path: with and without image rows, after a cached prefix, and in the steps that follow a longer one.

On the CPU the graph runner runs its static buffers eagerly, so this pins the padding, the image
rows and the scratch slots; capture itself is exercised by the GPU tests."""

from __future__ import annotations

import math

import torch

from vlmdeploy import GenerationConfig, PytorchEngineConfig, pipeline
from vlmdeploy.engine.graphs.prefill import PREFILL_BUCKETS, PrefillGraphs
from vlmdeploy.engine.step_inputs import StepInputs

GEN = GenerationConfig(max_new_tokens=6, min_new_tokens=6)


def attach(pipe, buckets: tuple[int, ...]) -> tuple[PrefillGraphs, list[int]]:
    runner, cfg = pipe.engine.core.runner, pipe.engine.core.cfg
    graphs = PrefillGraphs(
        runner.model,
        pipe.model_cfg.text.hidden_size,
        cfg.dtype,
        math.ceil(cfg.session_len / cfg.block_size),
        runner.scratch_block,
        cfg.block_size,
        runner.device,
        buckets=buckets,
        capture=False,
    )
    calls: list[int] = []
    run = graphs.replay
    graphs.replay = lambda inputs: calls.append(len(inputs.ids)) or run(inputs)
    runner.prefill_graphs = graphs
    return graphs, calls


def one_seq(ids, positions, slots, kv_len, table, image, mask) -> StepInputs:
    """A one-sequence step as the runner packs it."""
    cu = [0, len(ids)]
    return StepInputs(ids, positions, slots, cu, [kv_len], [table], [image], [mask], None, [0])


def chat(images):
    first = [{"role": "user", "content": [
        {"type": "image", "image": images[1]}, {"type": "text", "text": "what is in it?"}]}]
    second = [*first, {"role": "assistant", "content": "a square"},
              {"role": "user", "content": "and its colour?"}]
    return first, second


def run_all(pipe, images) -> list[list[int]]:
    """One request at a time: every prefill step holds one sequence."""
    prompts = ["hi", ("describe", images[0]), "a longer prompt " * 150, "x y", *chat(images)]
    return [pipe(p, gen_config=GEN).token_ids for p in prompts]


def test_padded_prefill_matches_eager(tiny_ckpts, images):
    cfg = PytorchEngineConfig(
        session_len=2048, block_size=16, max_batch_size=8, enable_prefix_caching=True
    )
    with pipeline(tiny_ckpts["original"], cfg) as pipe:
        eager = run_all(pipe, images)
    with pipeline(tiny_ckpts["original"], cfg) as pipe:  # empty caches
        graphs, calls = attach(pipe, (16, 32, 64, 128, 320))
        padded = run_all(pipe, images)
        cached = pipe(chat(images)[1], gen_config=GEN)  # the prefix is in the cache by now
    assert padded == eager
    assert cached.token_ids == eager[-1]
    assert cached.cached_tokens > 0
    assert any(n not in graphs.buckets for n in calls)  # padded steps ran
    assert any(n > 256 for n in calls)  # the one-tile image prompt (256 image rows) ran padded
    # every prefill but two beyond the largest bucket: the long prompt and the 3-tile first turn;
    # the second turn and its repeat computed only what the prefix cache did not hold
    assert len(calls) == 5 and calls[-1] < calls[-2] < 64


def test_padding_rows_point_at_the_scratch_block(tiny_ckpts):
    cfg = PytorchEngineConfig(session_len=1024, block_size=16, max_batch_size=4)
    with pipeline(tiny_ckpts["original"], cfg) as pipe:
        graphs, _ = attach(pipe, (8, 32))
        scratch = graphs.scratch_slot
        table = [0, 1]
        first = list(range(20))
        graphs.replay(one_seq(first, first, first, 20, table, None, None))
        assert graphs.slot_mapping[:20].tolist() == list(range(20))
        graphs.replay(one_seq([1, 2, 3], [0, 1, 2], [5, 6, 7], 3, table, None, None))
        assert graphs.slot_mapping[:3].tolist() == [5, 6, 7]
        assert (graphs.slot_mapping[3:] == scratch).all()
        assert graphs.cu_seqlens.tolist() == [0, 3] and graphs.kv_lens.tolist() == [3]


def test_image_rows_reach_the_graph(tiny_ckpts):
    cfg = PytorchEngineConfig(session_len=1024, block_size=16, max_batch_size=4)
    with pipeline(tiny_ckpts["original"], cfg) as pipe:
        graphs, _ = attach(pipe, (8,))
        h = pipe.model_cfg.text.hidden_size
        image = torch.randn(2, h)
        mask = torch.tensor([False, True, False, True, False])
        graphs.replay(one_seq([1] * 5, list(range(5)), list(range(5)), 5, [0], image, mask))
        assert graphs.image_mask[:5].tolist() == mask.tolist()
        torch.testing.assert_close(graphs.image_rows[[1, 3]], image.to(graphs.image_rows.dtype))
        graphs.replay(one_seq([1] * 4, list(range(4)), list(range(4)), 4, [0], None, None))
        assert not graphs.image_mask[:4].any()


def test_buckets_stay_within_the_context_and_the_step_budget(tiny_ckpts):
    cfg = PytorchEngineConfig(session_len=200, block_size=16, max_batch_size=4)
    with pipeline(tiny_ckpts["original"], cfg) as pipe:
        runner = pipe.engine.core.runner
        args = (runner.model, pipe.model_cfg.text.hidden_size, pipe.engine.core.cfg.dtype,
                math.ceil(200 / 16), runner.scratch_block, 16, runner.device)
        assert PrefillGraphs(*args, capture=False).buckets[-1] == 192  # 13 blocks: 208 tokens
        small = PrefillGraphs(*args, max_tokens=100, capture=False)
        assert small.buckets[-1] == 96 and not small.can_run(97, 2) and small.can_run(96, 6)
        none = PrefillGraphs(*args, max_tokens=8, capture=False)
        assert none.buckets == () and not none.can_run(4, 1)


def test_buckets_cover_every_count_up_to_the_largest():
    assert all(any(b >= n for b in PREFILL_BUCKETS) for n in range(2, PREFILL_BUCKETS[-1] + 1))
    assert list(PREFILL_BUCKETS) == sorted(set(PREFILL_BUCKETS))
