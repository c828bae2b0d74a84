"""Asynchronous scheduling: each step is launched before the previous step's tokens are read, and
the next step takes them on the device. Whatever the requests do (greedy, seeded sampling,
penalties, logprobs, stop ids found a step late, length stops, aborts, preemption, prefix caching),
the outputs must equal those of the synchronous engine, and no KV block may leak."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from vlmdeploy import PytorchEngineConfig
from vlmdeploy.config import ModelConfig
from vlmdeploy.engine import EngineConfig, LLMEngine
from vlmdeploy.engine.io import EngineRequest
from vlmdeploy.engine.sampling import SampleResult, SamplingParams
from vlmdeploy.engine.sequence import PENDING
from vlmdeploy.testing.guides import AllowOnly

IMAGE_TOKEN = 7  # text-only prompts here; any id the prompts do not use


def make_engine(ckpt: str, async_scheduling: bool, **kw) -> LLMEngine:
    cfg = PytorchEngineConfig(
        session_len=256,
        block_size=16,
        num_gpu_blocks=kw.pop("num_gpu_blocks", 64),
        device_type="cpu",
        async_scheduling=async_scheduling,
        **kw,
    )
    return LLMEngine(EngineConfig.build(cfg, ModelConfig.from_pretrained(ckpt), ckpt, IMAGE_TOKEN))


def prompt(i: int, n: int = 20) -> list[int]:
    return [(37 * i + 11 * j) % 900 + 20 for j in range(n)]


def run(engine: LLMEngine, requests: list[tuple[list[int], SamplingParams]], abort_at=None):
    """Step until idle; per request: [(token, finish_reason, num_output, logprobs)], the number of
    steps, and the largest number of pending tokens seen on one sequence."""
    outs: dict[int, list] = {i: [] for i in range(len(requests))}
    for i, (ids, p) in enumerate(requests):
        engine.add(EngineRequest(i, list(ids), dataclasses.replace(p)))
    steps = most_pending = 0
    while engine.has_work():
        for o in engine.step():
            outs[o.seq_id].append((o.token_id, o.finish_reason, o.num_output_tokens, o.logprobs))
        steps += 1
        seqs = list(engine.seqs.values())
        most_pending = max([most_pending] + [s.num_pending for s in seqs])
        if abort_at and steps == abort_at[0]:
            out = engine.abort(abort_at[1])
            if out is not None:
                outs[out.seq_id].append((None, out.finish_reason, out.num_output_tokens, None))
    assert engine.blocks.num_free == engine.num_blocks, "a KV block leaked"
    return outs, steps, most_pending


def tokens_of(outs) -> list[int]:
    return [t for t, *_ in outs if t is not None]


@pytest.fixture(scope="module")
def engines(tiny_ckpts):
    ckpt = tiny_ckpts["original"]
    return make_engine(ckpt, False), make_engine(ckpt, True)


def mixed_requests(stop_id: int) -> list[tuple[list[int], SamplingParams]]:
    return [
        (prompt(0), SamplingParams(max_new_tokens=12)),
        (prompt(0), SamplingParams(max_new_tokens=12, stop_token_ids=frozenset({stop_id}))),
        (prompt(1), SamplingParams(greedy=False, temperature=0.8, top_p=0.9, seed=5,
                                   max_new_tokens=10)),
        (prompt(3), SamplingParams(logprobs=3, max_new_tokens=6)),
        (prompt(0), SamplingParams(max_new_tokens=12, min_new_tokens=6,
                                   stop_token_ids=frozenset({stop_id}))),
        (prompt(4, 70), SamplingParams(max_new_tokens=1)),  # several prefill chunks, one token
        # the stop id is read while the next step, the request's last by length, is in flight
        (prompt(0), SamplingParams(max_new_tokens=5, stop_token_ids=frozenset({stop_id}))),
    ]


def test_async_outputs_equal_sync_outputs(engines):
    sync, asyn = engines
    first = tokens_of(run(sync, [(prompt(0), SamplingParams(max_new_tokens=12))])[0][0])
    stop_id = first[3]  # request 1 stops on its 4th token; request 5 may not stop before its 7th
    requests = mixed_requests(stop_id)
    want, sync_steps, _ = run(sync, requests)
    got, async_steps, most_pending = run(asyn, requests)
    assert most_pending == 1, "the async engine never had a token in flight"
    for i in want:
        assert [o[:3] for o in got[i]] == [o[:3] for o in want[i]], f"request {i}"
        for (*_, lp_got), (*_, lp_want) in zip(got[i], want[i]):
            assert (lp_got is None) == (lp_want is None)
            if lp_want is not None:
                assert lp_got.keys() == lp_want.keys()
                assert list(lp_got.values()) == pytest.approx(list(lp_want.values()), abs=1e-4)
    assert tokens_of(want[1])[-1] == stop_id and want[1][-1][1] == "stop"
    assert len(tokens_of(want[1])) == 4
    assert want[0][-1][1] == "length" and len(tokens_of(want[0])) == 12
    assert want[6][-1][1] == "stop" and len(tokens_of(want[6])) == 4
    assert async_steps <= sync_steps + 1  # the last step's tokens are read one step later


def test_penalised_sampling_reads_its_tokens_between_forward_and_sampling(engines, monkeypatch):
    """Penalties read the token history: a step holding such a request reads the step before
    once its own forward is queued, and samples after (a PENDING id in a history would make the
    penalty's bincount fail). The forward never waits for the host; a request that the read
    ends (its stop id) has its row of the step dropped; outputs equal the synchronous engine's."""
    sync, asyn = engines
    free = run(sync, [(prompt(2), SamplingParams(greedy=False, temperature=1.0, seed=7,
                                                 repetition_penalty=1.3, max_new_tokens=9))])
    stop_id = tokens_of(free[0][0])[4]
    requests = [
        (prompt(2), SamplingParams(greedy=False, temperature=1.0, repetition_penalty=1.3,
                                   frequency_penalty=0.2, seed=7, max_new_tokens=9)),
        (prompt(2), SamplingParams(greedy=False, temperature=1.0, repetition_penalty=1.3,
                                   seed=7, max_new_tokens=9, stop_token_ids=frozenset({stop_id}))),
        (prompt(5), SamplingParams(max_new_tokens=14)),
    ]
    want, _, _ = run(sync, requests)
    events: list[str] = []
    forward, resolve = asyn.executor.forward, SampleResult.resolve
    monkeypatch.setattr(asyn.executor, "forward",
                        lambda *a: (events.append("forward"), forward(*a))[1])
    monkeypatch.setattr(SampleResult, "resolve",
                        lambda self: (events.append("read"), resolve(self))[1])
    got, _, _ = run(asyn, requests)
    assert got == want
    assert tokens_of(want[1])[-1] == stop_id and want[1][-1][1] == "stop"
    # after the first step, every read of a step comes after the next step's forward is queued
    order = "".join("f" if e == "forward" else "r" for e in events)
    assert order.startswith("ffr") and "rr" not in order.rstrip("r"), order


def test_a_request_aborted_with_a_token_in_flight_ends_once(engines):
    _, asyn = engines
    requests = [(prompt(i), SamplingParams(max_new_tokens=30)) for i in range(3)]
    outs, _, _ = run(asyn, requests, abort_at=(5, 1))
    finals = [o for o in outs[1] if o[1] is not None]
    assert finals == [outs[1][-1]] and finals[0][1] == "abort"
    assert finals[0][2] == len(tokens_of(outs[1]))  # the dropped in-flight token is not counted
    assert len(tokens_of(outs[0])) == len(tokens_of(outs[2])) == 30


def test_preemption_with_tokens_in_flight_gives_the_same_outputs(tiny_ckpts):
    ckpt = tiny_ckpts["original"]
    requests = [(prompt(i, 30), SamplingParams(max_new_tokens=40)) for i in range(6)]
    results = []
    for async_scheduling in (False, True):
        engine = make_engine(ckpt, async_scheduling, num_gpu_blocks=12)
        outs, _, _ = run(engine, requests)
        assert engine.scheduler.num_preemptions > 0
        results.append(outs)
    assert results[0] == results[1]


def test_prefix_cache_registers_blocks_with_the_sampled_tokens(tiny_ckpts):
    """Blocks that end in a token still in flight are registered once it is read, under the real
    token: a follow-up prompt holding the whole first answer finds every full block."""
    engine = make_engine(tiny_ckpts["original"], True, enable_prefix_caching=True)
    first = prompt(5, 16)
    outs, _, _ = run(engine, [(first, SamplingParams(max_new_tokens=32))])
    answer = tokens_of(outs[0])
    follow = first + answer + [3, 4, 5]  # 51 tokens: blocks 0-2 hold prompt + answer
    engine.add(EngineRequest(9, follow, SamplingParams(max_new_tokens=1)))
    seq = engine.seqs[9]
    engine.step()
    assert seq.num_cached == 32  # the last answer token never had KV: blocks 0 and 1 are reused
    while engine.has_work():
        engine.step()
    assert PENDING not in seq.token_ids


def test_pending_token_is_not_read_on_the_host(tiny_ckpts):
    """After a launch the new token is a placeholder on the host; the next step fills it."""
    engine = make_engine(tiny_ckpts["original"], True)
    engine.add(EngineRequest(1, prompt(6), SamplingParams(max_new_tokens=5)))
    assert engine.step() == []  # the prefill is launched; its token is not read yet
    seq = engine.seqs[1]
    assert seq.token_ids[-1] == PENDING and seq.num_pending == 1
    outs = engine.step()  # launches the first decode, then reads the prefill's token
    assert [o.num_output_tokens for o in outs] == [1]
    assert seq.token_ids[-2] == outs[0].token_id and seq.token_ids[-1] == PENDING
    while engine.has_work():
        engine.step()


def guided_requests() -> list[tuple[list[int], SamplingParams]]:
    allowed = [frozenset(range(40, 60)), frozenset({5, 300, 301, 777})]
    return [
        (prompt(0), SamplingParams(max_new_tokens=10, guide=AllowOnly(allowed[0]))),
        (prompt(1), SamplingParams(max_new_tokens=12)),
        (prompt(2), SamplingParams(greedy=False, seed=3, max_new_tokens=8,
                                   guide=AllowOnly(allowed[1]))),
    ]


def test_guided_masks_are_filled_while_the_engine_schedules_the_next_step(
    engines, monkeypatch
):
    """A step's guided masks are filled on a worker thread: the engine thread makes the outputs
    of the step before, hands them over and schedules the next step meanwhile, and queues the
    sampling at the next launch. Each fill here waits for that next schedule (a fill on the
    engine thread would wait in vain), the masks start once the grammars have taken the step
    before's tokens, before its outputs are made, and the tokens equal the synchronous engine's,
    which fills them inline."""
    sync, asyn = engines
    want, _, _ = run(sync, guided_requests())
    scheduled, seen, events = threading.Event(), [], []
    from vlmdeploy.engine import llm_engine

    class Masks(llm_engine.GuideMasks):
        def __init__(self, *args):
            scheduled.clear()  # on the engine thread, before the fill is handed over
            events.append("m")
            super().__init__(*args)

    def schedule(original=asyn.scheduler.schedule):
        scheduled.set()
        events.append("|")
        return original()

    def step_output(*args, original=llm_engine.StepOutput, **kw):
        events.append("o")
        return original(*args, **kw)

    monkeypatch.setattr(llm_engine, "GuideMasks", Masks)
    monkeypatch.setattr(llm_engine, "StepOutput", step_output)
    monkeypatch.setattr(asyn.scheduler, "schedule", schedule)
    monkeypatch.setattr(AllowOnly, "on_compute", lambda: seen.append(
        (scheduled.wait(5), threading.current_thread() is threading.main_thread())))
    got, _, _ = run(asyn, guided_requests())
    assert [[o[:3] for o in got[i]] for i in got] == [[o[:3] for o in want[i]] for i in want]
    assert len(seen) >= 10 and all(s == (True, False) for s in seen), seen
    order = "".join(events)
    assert "|mo" in order and "om" not in order, order
    for i in (0, 2):
        assert set(tokens_of(got[i])) <= guided_requests()[i][1].guide.tokens


def test_a_mask_fill_that_raises_ends_its_step_requests_with_an_error(engines, monkeypatch):
    """What the filling raises on the worker reaches the engine when the sampling is queued: the
    requests of that step end with an error, no block leaks, and the engine serves on."""
    _, asyn = engines
    fills = []

    def fail_third() -> None:
        fills.append(1)
        if len(fills) == 3:
            raise RuntimeError("mask filling broke")

    monkeypatch.setattr(AllowOnly, "on_compute", fail_third)
    outs, _, _ = run(asyn, guided_requests()[:1])
    assert outs[0][-1][1] == "error" and len(tokens_of(outs[0])) == 2
    again, _, _ = run(asyn, guided_requests())
    assert [o[-1][1] for o in again.values()] == ["length"] * 3
