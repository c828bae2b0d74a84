"""Faults inside the engine: each ends with errors for the requests it touches, leaves the others
unharmed, leaks no KV block, and answers every request exactly once — or, when the engine itself
is broken (a hang, failures in a row), ends every request and reports the engine dead, in bounded
time, never a hang."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from vlmdeploy import GenerationConfig, PytorchEngineConfig, pipeline
from vlmdeploy.engine.engine_loop import EngineLoop
from vlmdeploy.errors import EngineDeadError

GEN = GenerationConfig(max_new_tokens=6, min_new_tokens=6)


@pytest.fixture
def pipe(tiny_ckpts):
    with pipeline(tiny_ckpts["original"], PytorchEngineConfig(session_len=4096)) as p:
        yield p


def _image(seed: int):
    from PIL import Image

    return Image.new("RGB", (64, 48), (seed * 40 % 256, 90, 160))


def no_leak(pipe) -> bool:
    core = pipe.engine.core
    return core.blocks.num_free == core.num_blocks and not core.seqs


def test_a_step_that_raises_fails_its_requests_and_the_engine_serves_on(pipe):
    forward, calls = pipe.engine.core.runner.forward, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second step: the batch of the two prompts below
            raise RuntimeError("injected fault")
        return forward(*args, **kwargs)

    pipe("warm", gen_config=GEN)
    calls.clear()
    pipe.engine.core.runner.forward = flaky
    hit = pipe(["one", "two"], gen_config=GEN)
    after = pipe(["three", ("four", _image(1))], gen_config=GEN)
    errors = [r for r in hit if r.finish_reason == "error"]
    assert errors and all("failed (RuntimeError)" in r.error_message for r in errors)
    assert [r.finish_reason for r in after] == ["length", "length"]
    assert pipe.engine.alive and no_leak(pipe)


def test_out_of_memory_in_the_vision_encoder_fails_only_image_requests_of_that_step(pipe):
    encode = pipe.engine.core.vision.encode
    state = {"armed": True}

    def oom(tiles):
        if state["armed"]:
            state["armed"] = False
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return encode(tiles)

    pipe.engine.core.vision.encode = oom
    out = pipe(("what is it?", _image(2)), gen_config=GEN)
    assert out.finish_reason == "error" and "ran out of device memory" in out.error_message
    again = pipe([("what is it?", _image(2)), "text only"], gen_config=GEN)
    assert [r.finish_reason for r in again] == ["length", "length"]
    assert no_leak(pipe)


def test_non_finite_logits_end_only_the_affected_request(pipe):
    """NaN or inf logits for one row: that request ends with an error at once (its tokens would be
    noise); the other rows of the same steps stream as usual."""
    forward = pipe.engine.core.runner.forward
    poisoned = {}

    def nan_for_one(batch, rows, *args):
        logits = forward(batch, rows, *args)
        for r, i in enumerate(rows):
            if batch.seqs[i].seq_id == poisoned.get("id") and logits is not None:
                logits = logits.clone()
                logits[r] = float("nan") if batch.seqs[i].num_output > 1 else float("inf")
        return logits

    pipe.engine.core.runner.forward = nan_for_one
    poisoned["id"] = pipe.new_session_id() + 1  # the first of the next batch
    out = pipe(["poisoned", "healthy", "healthy too"], gen_config=GEN)
    assert out[0].finish_reason == "error" and "non-finite" in out[0].error_message
    assert [r.finish_reason for r in out[1:]] == ["length", "length"]
    assert [r.generate_token_len for r in out[1:]] == [6, 6]
    assert no_leak(pipe)


def test_long_generations_that_exhaust_the_kv_cache_all_finish(tiny_ckpts):
    """More running generations than the cache holds: sequences are preempted and recomputed,
    every request finishes with all its tokens, and every block comes back."""
    cfg = PytorchEngineConfig(session_len=512, block_size=16, num_gpu_blocks=48)
    with pipeline(tiny_ckpts["original"], cfg) as p:
        gen = GenerationConfig(max_new_tokens=120, min_new_tokens=120)
        out = p([f"story number {i}" for i in range(10)], gen_config=gen)
        assert [r.generate_token_len for r in out] == [120] * 10
        assert {r.finish_reason for r in out} == {"length"}
        assert p.engine.core.scheduler.num_preemptions > 0
        assert no_leak(p)


class _HangingEngine:
    """Just enough of LLMEngine for the loop: its first step never ends (until released)."""

    def __init__(self):
        self.release_step = threading.Event()
        self.work = True

    def warm_up(self) -> None:
        pass

    def has_work(self) -> bool:
        return self.work

    def add(self, request) -> None:
        self.work = True

    def step(self):
        self.release_step.wait(30)
        return []

    distributed = False
    abandoned = False

    def failure(self) -> None:
        return None

    def abandon(self) -> None:
        self.abandoned = True

    def release(self) -> None:
        pass


def test_the_watchdog_ends_every_request_when_a_step_hangs():
    from vlmdeploy.engine.io import EngineRequest
    from vlmdeploy.engine.sampling import SamplingParams

    engine = _HangingEngine()
    loop = EngineLoop(engine, step_timeout_s=0.5)
    outs: list = []
    done = threading.Event()

    def callback(out):
        outs.append(out)
        done.set()

    loop.add(EngineRequest(1, [1, 2, 3], SamplingParams(max_new_tokens=4)), callback)
    t0 = time.monotonic()
    assert done.wait(10), "no final output for a request of a hung engine"
    assert time.monotonic() - t0 < 5
    assert [o.finish_reason for o in outs] == ["error"] and "stopped responding" in outs[0].error
    assert not loop.alive
    with pytest.raises(EngineDeadError):
        loop.stats()
    with pytest.raises(EngineDeadError):
        loop.add(EngineRequest(2, [1], SamplingParams(max_new_tokens=1)), callback)
    t0 = time.monotonic()
    loop.close()  # returns although the step never did
    assert time.monotonic() - t0 < 5
    assert engine.abandoned  # its worker processes (tensor parallelism) are stopped anyway
    engine.release_step.set()
