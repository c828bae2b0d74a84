"""Outputs reach consumers once per engine step per channel, and batching changes no text.

A consumer of hundreds of streams (``pipe(prompts)``, the server's event loop) must not be woken
once per token: the engine thread would hand the interpreter lock back and forth with it hundreds of
times a step."""

from __future__ import annotations

import asyncio
import gc
import threading
import time

import pytest

from vlmdeploy import GenerationConfig, PytorchEngineConfig, pipeline
from vlmdeploy.engine.engine_loop import Subscription


@pytest.fixture(scope="module")
def pipe(tiny_ckpts):
    with pipeline(tiny_ckpts["original"], PytorchEngineConfig(session_len=600)) as p:
        yield p


class CountingChannel:
    def __init__(self):
        self.sends: list[list] = []
        self.done = threading.Event()
        self.finished = 0

    def send(self, items):
        self.sends.append(items)
        self.finished += sum(1 for _, out in items if out.finish_reason)
        if self.finished == 8:
            self.done.set()


def test_a_channel_gets_one_send_per_step_for_all_its_requests(pipe):
    channel = CountingChannel()
    steps = []
    engine_step = pipe.engine.core.step
    pipe.engine.core.step = lambda: steps.append(1) or engine_step()
    try:
        for i in range(8):
            req = pipe.prepare_sync(f"prompt {i}", GenerationConfig(max_new_tokens=6))
            pipe.streamer.submit(req, 9000 + i, Subscription(channel, 9000 + i))
        assert channel.done.wait(60)
    finally:
        pipe.engine.core.step = engine_step
    outputs = [item for batch in channel.sends for item in batch]
    assert len(outputs) == 8 * 6 and {k for k, _ in outputs} == set(range(9000, 9008))
    assert len(channel.sends) <= len(steps) < len(outputs)  # batched, at most once per step
    assert any(len(batch) > 1 for batch in channel.sends)


def test_a_failing_channel_does_not_stop_the_engine(pipe):
    class Broken:
        def send(self, items):
            raise RuntimeError("consumer gone")

    req = pipe.prepare_sync("x", GenerationConfig(max_new_tokens=3))
    pipe.streamer.submit(req, 9100, Subscription(Broken(), 9100))
    after = pipe("still serving", gen_config=GenerationConfig(max_new_tokens=3))
    assert after.generate_token_len == 3


@pytest.mark.parametrize("stop", [None, ["e"]])
def test_whole_responses_equal_the_joined_stream(pipe, stop):
    prompts = ["tell me about shapes", "a red circle", "hi", "count the stars please"]
    gen = GenerationConfig(max_new_tokens=24, stop_words=stop)
    whole = pipe(prompts, gen_config=gen)
    parts = {i: [] for i in range(len(prompts))}
    ids = {i: [] for i in range(len(prompts))}
    for r in pipe.stream_infer(prompts, gen_config=gen):
        parts[r.index].append(r.text)
        ids[r.index] += r.token_ids
    for i, r in enumerate(whole):
        assert r.text == "".join(parts[i]) and r.token_ids == ids[i]
        assert r.generate_token_len == len(r.token_ids) or r.finish_reason == "stop"


def test_one_event_loop_shares_one_channel(pipe):
    async def main():
        reqs = [await pipe.prepare(f"p{i}", GenerationConfig(max_new_tokens=5)) for i in range(3)]

        async def run(i, req):
            return [o async for o in pipe.generate_prepared(req, session_id=9200 + i)]

        outs = await asyncio.gather(*(run(i, r) for i, r in enumerate(reqs)))
        return outs, list(pipe.streamer._channels.values())

    outs, channels = asyncio.run(main())
    assert all(o[-1].finish_reason == "length" and o[-1].generate_token_len == 5 for o in outs)
    assert len(channels) == 1  # three requests, one channel
    del channels
    # The channel holds its loop weakly: a finished loop's entry goes away. The engine thread may
    # still be returning from its last hand-over (a frame holding the loop) for a moment.
    for _ in range(200):
        gc.collect()
        if not pipe.streamer._channels:
            break
        time.sleep(0.01)
    assert len(pipe.streamer._channels) == 0
