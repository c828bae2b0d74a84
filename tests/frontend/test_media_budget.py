"""Slow image hosts: a request's images share one deadline, a cancelled request stops fetching, and
text-only prompts never wait behind image fetches."""

from __future__ import annotations

import asyncio
import http.server
import io
import threading
import time

import pytest
from PIL import Image

from vlmdeploy import GenerationConfig, PytorchEngineConfig, pipeline
from vlmdeploy.errors import ImageError
from vlmdeploy.vl.media import MediaPolicy

DELAY = 0.6
GEN = GenerationConfig(max_new_tokens=2)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 10)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def slow_host():
    body, hits = _png(), []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            time.sleep(DELAY)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()


@pytest.fixture(scope="module")
def pipe(tiny_ckpts):
    with pipeline(tiny_ckpts["original"], PytorchEngineConfig(session_len=4096)) as p:
        yield p


def prompt(base: str, n: int, tag: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": f"{base}/{tag}{i}.png"}} for i in range(n)]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "hi"}]}]


def test_a_requests_images_share_one_deadline(pipe, slow_host):
    base, _ = slow_host
    policy = MediaPolicy(allow_private_networks=True, timeout_s=1.0)  # 2 s for the request
    with pytest.raises(ImageError) as err:
        pipe.prepare_sync(prompt(base, 4, "deadline"), GEN, media_policy=policy)
    assert err.value.code == "image_fetch_timeout"
    pipe.prepare_sync(prompt(base, 2, "fits"), GEN, media_policy=policy)  # 1.2 s: fine


def test_cancelled_request_stops_fetching(pipe, slow_host):
    base, hits = slow_host
    policy = MediaPolicy(allow_private_networks=True, timeout_s=5.0)

    async def main():
        task = asyncio.ensure_future(pipe.prepare(prompt(base, 4, "cancel"), GEN,
                                                  media_policy=policy))
        await asyncio.sleep(DELAY / 2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    time.sleep(DELAY * 2)
    assert sum(p.startswith("/cancel") for p in hits) == 1  # the rest were never fetched


def test_text_prompts_do_not_wait_for_image_fetches(pipe, slow_host):
    base, _ = slow_host
    policy = MediaPolicy(allow_private_networks=True, timeout_s=5.0)

    async def main():
        slow = [asyncio.ensure_future(pipe.prepare(prompt(base, 3, f"busy{i}/"), GEN,
                                                   media_policy=policy)) for i in range(8)]
        await asyncio.sleep(0.1)  # every media worker is now waiting on the slow host
        t0 = time.monotonic()
        await pipe.prepare("just text", GEN)
        took = time.monotonic() - t0
        await asyncio.gather(*slow)
        return took

    assert asyncio.run(main()) < DELAY
