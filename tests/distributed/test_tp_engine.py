"""Tensor parallelism end to end on the CPU (gloo): a tp=2 or tp=4 engine gives exactly tp=1's
greedy tokens and logits within 1e-4 (fp32), on both checkpoint formats and both vision towers,
with preemption and prefix caching in play; and the executor's checks come before any load."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.conftest import solid_image
from vlmdeploy import GenerationConfig, PytorchEngineConfig, pipeline
from vlmdeploy.testing.checkpoint import make_checkpoint

# Vision towers whose head count (5) no tensor-parallel size above 1 here divides, as
# InternViT-6B's 25 heads do for 2 and 8.
_FIVE_HEADS = {"hidden_size": 80, "num_attention_heads": 5}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tp-ckpt")
    out = {}
    for name, preset, fmt in [
        ("300m-original", "tiny", "original"),
        ("300m-hf", "tiny", "hf"),
        ("6b-original", "tiny-6b", "original"),
        ("6b-hf", "tiny-6b", "hf"),
    ]:
        out[name] = str(
            make_checkpoint(root / name, preset, fmt, seed=0, vision_overrides=_FIVE_HEADS)
        )
    return out


def _config(tp: int, quant_policy: int = 0) -> PytorchEngineConfig:
    # 48 blocks of 16 tokens: the four prompts (two of one-tile images, 256 tokens a tile) are
    # admitted together, and their answers outgrow the cache, so the scheduler must preempt.
    return PytorchEngineConfig(
        tp=tp, device_type="cpu", block_size=16, num_gpu_blocks=48, max_batch_size=4,
        enable_prefix_caching=True, session_len=1024, quant_policy=quant_policy,
    )  # fmt: skip


def _prompts(images) -> list:
    shared = "You are a careful assistant. Describe everything you see in detail. " * 2
    return [
        (shared + "What is in the picture?", images[0]),  # an image: the vision stage runs
        shared + "Count from one to ten.",  # the same prefix: cached blocks reused
        shared + "Name three colours.",
        ("What is in this other picture?", images[3]),  # with the first: tiles to share out
    ]


@pytest.fixture(scope="module")
def pictures(images) -> list:
    return [*images, solid_image(320, 320, 4)]


def _run(path: str, tp: int, images, quant_policy: int = 0) -> tuple[list[list[int]], dict, dict]:
    """Every answer's tokens, the logits of every sampled token keyed by (request, position), and
    the engine's counters. Keyed, not by step: when requests arrive (their images are prepared on
    other threads) decides which steps they share."""
    gen = GenerationConfig(max_new_tokens=40, do_sample=False, ignore_eos=True)
    with pipeline(path, backend_config=_config(tp, quant_policy), log_level="WARNING") as pipe:
        executor = pipe.engine.core.executor
        logits, forward = {}, executor.forward

        def spy(batch, rows, prev_tokens):
            out = forward(batch, rows, prev_tokens)
            for row, i in enumerate(rows):
                seq, n = batch.seqs[i], batch.num_tokens[i]
                prompt = tuple(seq.token_ids[: seq.num_prompt_tokens])  # ids differ per run
                logits[prompt, seq.num_computed + n] = out[row].detach().clone()
            return out

        executor.forward = spy
        outs = pipe(_prompts(images), gen_config=gen)
        stats = pipe.engine.stats()
    return [o.token_ids for o in outs], logits, stats


@pytest.mark.parametrize(
    "name, tp",
    [("300m-original", 2), ("300m-hf", 2), ("6b-original", 2), ("6b-hf", 2), ("6b-hf", 4)],
)
def test_tensor_parallel_matches_one_rank(ckpts, pictures, name, tp):
    ref_tokens, ref_logits, ref_stats = _run(ckpts[name], 1, pictures)
    tokens, logits, stats = _run(ckpts[name], tp, pictures)
    # Both schedules include preemption (how often depends on when each request arrived).
    assert ref_stats["num_preemptions"] > 0 and stats["num_preemptions"] > 0
    assert tokens == ref_tokens
    # Every answer token's logits, in both runs (a preempted request's recomputed prefill may add
    # a key to one of them).
    common = logits.keys() & ref_logits.keys()
    assert len(common) >= sum(map(len, tokens))
    for key in common:
        torch.testing.assert_close(logits[key], ref_logits[key], atol=1e-4, rtol=0)


def test_tensor_parallel_over_an_int4_cache_matches_one_rank(ckpts, pictures):
    """Each rank quantises and packs its own kv heads into its own cache (codes and pairs): the
    same tokens as one rank, and logits as close as the ranks' summation order lets quantisation
    codes agree."""
    ref_tokens, ref_logits, _ = _run(ckpts["300m-original"], 1, pictures, quant_policy=4)
    tokens, logits, _ = _run(ckpts["300m-original"], 2, pictures, quant_policy=4)
    assert tokens == ref_tokens
    common = logits.keys() & ref_logits.keys()
    assert len(common) >= sum(map(len, tokens))
    for key in common:
        torch.testing.assert_close(logits[key], ref_logits[key], atol=1e-3, rtol=0)


def test_a_head_count_the_ranks_cannot_split_is_refused_before_loading(ckpts):
    # The tiny language model has 4 attention heads: three ranks cannot share them.
    with pytest.raises(ValueError, match="tp=3|heads"):
        pipeline(ckpts["300m-hf"], backend_config=_config(3), log_level="WARNING")


def test_more_ranks_than_visible_gpus_is_refused_before_loading(ckpts):
    from vlmdeploy.config import ModelConfig
    from vlmdeploy.distributed.executor import make_executor
    from vlmdeploy.engine.config import EngineConfig
    from vlmdeploy.engine.observer import EngineObserver

    path = ckpts["300m-hf"]
    cfg = EngineConfig.build(_config(2), ModelConfig.from_pretrained(path), path, 0)
    visible = torch.cuda.device_count()
    cfg = dataclasses.replace(cfg, device=torch.device("cuda", 0), tp=visible + 2)
    cfg = dataclasses.replace(cfg, model=_with_heads(cfg.model, 4 * (visible + 2)))
    with pytest.raises(ValueError, match="GPUs"):
        make_executor(cfg, EngineObserver())


def _with_heads(model, heads: int):
    """A model config whose heads (and KV heads and MLP) split over ``heads`` ranks."""
    text = dataclasses.replace(
        model.text, num_heads=heads, num_kv_heads=heads, intermediate_size=heads * 32
    )
    return dataclasses.replace(model, text=text)
