"""RELIABILITY §3.4 load rows through the server, over real sockets, against the real pipeline on a
tiny random-weight checkpoint (CPU): a KV cache exhausted by long generations (L2), a client that
leaves while its image is still downloading (L3), and a crowd of clients that time out (L4)."""

from __future__ import annotations

import asyncio
import http.server
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from serve_helpers import REAL_SESSION_LEN, chat, run_live

from vlmdeploy import PytorchEngineConfig, pipeline
from vlmdeploy.serve import create_app
from vlmdeploy.vl.media import MediaPolicy

pytestmark = pytest.mark.slow
URL = "/v1/chat/completions"


def wait_idle(pipe: Any, timeout: float = 10.0) -> dict[str, Any]:
    """Wait until the engine runs nothing; its stats then."""
    deadline = time.monotonic() + timeout
    while (stats := pipe.stats())["num_running"] or stats["num_waiting"]:
        assert time.monotonic() < deadline, stats
        time.sleep(0.05)
    return stats


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


# ---- L2: the KV cache exhausted mid-decode ------------------------------------------------------


def test_l2_long_generations_past_the_kv_cache_all_finish_through_the_server(tiny_checkpoint):
    """Ten generations of 120 tokens need more blocks than the cache's 48: sequences are
    preempted and recomputed, every request still gets its 200 with all its tokens, and the
    preemptions show in /metrics."""
    cfg = PytorchEngineConfig(device_type="cpu", session_len=512, block_size=16, num_gpu_blocks=48)
    with pipeline(str(tiny_checkpoint), backend_config=cfg) as pipe:
        with run_live(create_app(pipe)) as url:

            async def main() -> list[httpx.Response]:
                async with httpx.AsyncClient(base_url=url, timeout=120) as http:
                    bodies = [chat(f"story number {i}", max_tokens=120, ignore_eos=True,
                                   temperature=0, stream=i % 2 == 1) for i in range(10)]
                    return await asyncio.gather(*(http.post(URL, json=b) for b in bodies))

            responses = asyncio.run(main())
            assert [r.status_code for r in responses] == [200] * 10
            for r in responses[::2]:  # the whole answers
                assert r.json()["usage"]["completion_tokens"] == 120
                assert r.json()["choices"][0]["finish_reason"] == "length"
            for r in responses[1::2]:  # the streams end well
                assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text
                assert '"finish_reason":"length"' in r.text
            text = httpx.get(url + "/metrics").text
            assert metric(text, "vllm:num_preemptions_total") > 0
        assert wait_idle(pipe)["kv_cache_usage"] == 0.0


# ---- L3: a client that leaves while its image downloads ----------------------------------------


class _Trickle(http.server.BaseHTTPRequestHandler):
    """An image host that sends one byte every 50 ms and notes when its client hung up."""

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.server.started.set()
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", "100000")
        self.end_headers()
        try:
            for _ in range(400):  # 20 s if nobody hangs up
                self.wfile.write(b"\x89")
                self.wfile.flush()
                time.sleep(0.05)
        except OSError:
            self.server.hung_up_at = time.monotonic()


@pytest.fixture
def trickle() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    server.started, server.hung_up_at = threading.Event(), None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_l3_disconnect_while_the_image_downloads_cancels_the_download(real_pipe, trickle):
    # the host is on loopback, so this app allows private hosts; its deadline is far away
    policy = MediaPolicy.server_default(allow_private_networks=True, timeout_s=30.0)
    app = create_app(real_pipe, media_policy=policy)
    image = f"http://127.0.0.1:{trickle.server_address[1]}/slow.png"
    body = chat([{"type": "image_url", "image_url": {"url": image}},
                 {"type": "text", "text": "what is it?"}], max_tokens=4)
    with run_live(app) as url, httpx.Client(base_url=url, timeout=0.5) as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post(URL, json=body)
        left = time.monotonic()
        assert trickle.started.wait(5)
        deadline = time.monotonic() + 5
        while trickle.hung_up_at is None:
            assert time.monotonic() < deadline, "the download went on after the client left"
            time.sleep(0.05)
        assert trickle.hung_up_at - left < 3.0
        deadline = time.monotonic() + 5
        while app.state.server.admission.in_flight:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert wait_idle(real_pipe)["kv_cache_usage"] == 0.0


# ---- L4: many clients that time out, then one that does not ------------------------------------


def test_l4_two_hundred_timed_out_clients_do_not_delay_the_next_one(real_pipe):
    app = create_app(real_pipe)
    with run_live(app) as url:

        async def crowd() -> list[BaseException | httpx.Response]:
            limits = httpx.Limits(max_connections=250)
            async with httpx.AsyncClient(base_url=url, timeout=0.5, limits=limits) as http:
                body = chat("tell me a long story", max_tokens=REAL_SESSION_LEN // 2,
                            ignore_eos=True, temperature=0)
                return await asyncio.gather(*(http.post(URL, json=body) for _ in range(200)),
                                            return_exceptions=True)

        outcomes = asyncio.run(crowd())
        assert all(isinstance(o, httpx.TimeoutException) for o in outcomes), outcomes[:3]
        start = time.monotonic()
        response = httpx.post(url + URL, json=chat("hi", max_tokens=8, temperature=0), timeout=30)
        assert response.status_code == 200
        assert time.monotonic() - start < 5.0
        deadline = time.monotonic() + 10
        while app.state.server.admission.in_flight:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert wait_idle(real_pipe)["kv_cache_usage"] == 0.0
