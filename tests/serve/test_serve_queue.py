"""`--max-concurrent-requests` as LMDeploy's: beyond the limit, requests wait for a slot in arrival
order instead of failing; `--max-queued-requests` bounds the wait (429 beyond); a waiting client
that leaves takes no slot."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fake_pipeline import FakePipeline
from serve_helpers import chat, run_live

from vlmdeploy.serve import ServerConfig, create_app
from vlmdeploy.serve.state import Admission

URL = "/v1/chat/completions"


def test_requests_beyond_the_limit_wait_and_are_all_served():
    fake = FakePipeline(token_delay=0.05)  # 4 tokens: ~0.2 s a request
    app = create_app(fake, ServerConfig(max_concurrent_requests=1))
    with run_live(app) as url, ThreadPoolExecutor(4) as pool:
        started = time.monotonic()
        results = list(pool.map(lambda _: httpx.post(url + URL, json=chat(), timeout=30),
                                range(4)))
        elapsed = time.monotonic() - started
    assert [r.status_code for r in results] == [200] * 4
    assert all(r.json()["choices"][0]["message"]["content"] == "Hello, world!" for r in results)
    assert elapsed >= 4 * 4 * 0.05 * 0.9  # one at a time: they queued
    assert len(fake.started) == 4


def test_beyond_the_queue_bound_is_429():
    fake = FakePipeline(token_delay=0.2)
    app = create_app(fake, ServerConfig(max_concurrent_requests=1, max_queued_requests=0))
    with run_live(app) as url, ThreadPoolExecutor(2) as pool:
        first = pool.submit(httpx.post, url + URL, json=chat(), timeout=30)
        time.sleep(0.3)
        second = httpx.post(url + URL, json=chat(), timeout=30)
        assert second.status_code == 429
        assert second.json()["error"]["code"] == "rate_limit_exceeded"
        assert first.result().status_code == 200


def test_slots_pass_in_arrival_order_and_cancelled_waiters_take_none():
    async def scenario():
        admission = Admission(limit=1, max_waiting=10)
        held = admission.try_enter()
        assert held is not None and admission.try_enter() is None
        order: list[int] = []

        async def waiter(i):
            slot = await admission.wait()
            order.append(i)
            await asyncio.sleep(0)
            slot.release()

        tasks = [asyncio.ensure_future(waiter(i)) for i in range(3)]
        gone = asyncio.ensure_future(admission.wait())
        await asyncio.sleep(0)
        gone.cancel()  # a client that left while waiting
        await asyncio.gather(gone, return_exceptions=True)
        assert admission.waiting == 3
        held.release()
        await asyncio.gather(*tasks)
        assert order == [0, 1, 2]
        assert admission.in_flight == 0 and admission.waiting == 0

    asyncio.run(scenario())


def test_a_slot_handed_to_a_cancelled_waiter_passes_on():
    async def scenario():
        admission = Admission(limit=1, max_waiting=10)
        held = admission.try_enter()
        first = asyncio.ensure_future(admission.wait())
        second = asyncio.ensure_future(admission.wait())
        await asyncio.sleep(0)
        held.release()  # the slot goes to `first` ...
        first.cancel()  # ... which is cancelled before it runs
        await asyncio.gather(first, return_exceptions=True)
        slot = await asyncio.wait_for(second, 1)  # so `second` gets it
        slot.release()
        assert admission.in_flight == 0

    asyncio.run(scenario())


@pytest.mark.parametrize("limit", [None, 2])
def test_unlimited_and_free_slots_admit_at_once(limit):
    admission = Admission(limit, 0)
    slots = [admission.try_enter() for _ in range(2)]
    assert all(slots) and admission.in_flight == 2
    for s in slots:
        s.release()
        s.release()  # idempotent
    assert admission.in_flight == 0
