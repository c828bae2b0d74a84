"""The Python API refuses, before any expensive work, what the server refuses: text that cannot be
encoded wherever it is (RELIABILITY L17), prompts over `max_prompt_chars` or whose text alone
overflows `session_len` before any image is fetched (L15, P7, P20), and `min_new_tokens` beyond
what can be generated; and an image download stops promptly when its request is cancelled (L3).
The pipeline keeps serving after each refusal."""

from __future__ import annotations

import asyncio
import http.server
import io
import pathlib
import threading
import time
from collections.abc import Iterator

import pytest
from PIL import Image

from vlmdeploy import GenerationConfig, PytorchEngineConfig, pipeline
from vlmdeploy.errors import ContextLengthExceeded, ImageError, InvalidRequestError
from vlmdeploy.frontend.limits import PROMPT_CHARS_PER_TOKEN
from vlmdeploy.vl.media import MediaPolicy, load_image

GEN = GenerationConfig(max_new_tokens=2)
SESSION_LEN = 600


@pytest.fixture(scope="module")
def pipe(tiny_ckpts):
    with pipeline(tiny_ckpts["original"], PytorchEngineConfig(session_len=SESSION_LEN)) as p:
        yield p


def still_serves(pipe) -> None:
    assert pipe("hello", gen_config=GEN).generate_token_len == 2


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


# ---- L17: text that cannot be encoded ----------------------------------------------------------


def surrogate_prompts(s: str, root: pathlib.Path) -> dict[str, tuple[object, GenerationConfig]]:
    hi = {"role": "user", "content": "hi"}
    part = {"type": "text", "text": "look"}
    return {
        "string": (f"say {s}", GEN),
        "message": ([{"role": "user", "content": s}], GEN),
        "system": ([{"role": "system", "content": s}, hi], GEN),
        "assistant": ([hi, {"role": "assistant", "content": s}, hi], GEN),
        "text-part": ([{"role": "user", "content": [{"type": "text", "text": s}]}], GEN),
        "tuple-text": ((f"what {s}", png_bytes()), GEN),
        "image-path": (("describe", f"{root}/{s}.png"), GEN),
        "image-url": ([{"role": "user", "content": [part, {
            "type": "image_url", "image_url": {"url": f"https://example.com/{s}.png"}}]}], GEN),
        "data-url": ([{"role": "user", "content": [part, {
            "type": "image_url", "image_url": {"url": f"data:image/png;base64,{s}"}}]}], GEN),
        "stop-words": ("hi", GenerationConfig(max_new_tokens=2, stop_words=["ok", s])),
        "bad-words": ("hi", GenerationConfig(max_new_tokens=2, bad_words=[s])),
    }


PLACES = list(surrogate_prompts("x", pathlib.Path("/")))


@pytest.mark.parametrize("s", ["\ud800", "a\udfffb", "\udc80"], ids=["high", "low", "escapable"])
@pytest.mark.parametrize("place", PLACES)
def test_l17_lone_surrogates_are_invalid_request_errors(pipe, tmp_path, place, s):
    prompt, gen = surrogate_prompts(s, tmp_path)[place]
    with pytest.raises(InvalidRequestError) as info:
        pipe(prompt, gen_config=gen)
    assert info.value.code == "invalid_encoding", info.value
    assert info.value.param


def test_l17_a_raw_prompt_and_the_async_api_refuse_them_too(pipe):
    with pytest.raises(InvalidRequestError, match="UTF-8"):
        pipe.prepare_sync("raw \ud800", GEN, do_preprocess=False)
    with pytest.raises(InvalidRequestError):
        asyncio.run(pipe.prepare([{"role": "user", "content": "\udfff"}], GEN))
    still_serves(pipe)


def test_l17_a_path_object_without_utf8_form_is_an_image_error(pipe, tmp_path):
    with pytest.raises(ImageError) as info:
        pipe(("describe", tmp_path / "\ud800.png"), gen_config=GEN)
    assert info.value.code == "invalid_image_url"
    still_serves(pipe)


# ---- L15 / P7 / P20: size before work ----------------------------------------------------------


def test_p20_the_default_character_cap_is_derived_from_session_len(pipe):
    cap = PROMPT_CHARS_PER_TOKEN * SESSION_LEN
    assert pipe.preparer.max_prompt_chars == cap
    start = time.monotonic()
    for prompt in ("x" * (cap + 1), [{"role": "system", "content": "x" * cap},
                                     {"role": "user", "content": "y"}]):
        with pytest.raises(ContextLengthExceeded, match="max_prompt_chars"):
            pipe(prompt, gen_config=GEN)
    with pytest.raises(ContextLengthExceeded, match="max_prompt_chars"):
        pipe("z" * 5_000_000, gen_config=GEN)  # 5 MB: refused without being tokenised
    assert time.monotonic() - start < 2.0
    still_serves(pipe)


def test_l15_more_messages_than_session_len_are_refused(pipe):
    with pytest.raises(ContextLengthExceeded, match="messages and content parts"):
        pipe([{"role": "user", "content": ""}] * SESSION_LEN, gen_config=GEN)


def test_p20_max_prompt_chars_is_a_pipeline_option(tiny_ckpts):
    with pipeline(tiny_ckpts["original"], PytorchEngineConfig(session_len=SESSION_LEN),
                  max_prompt_chars=50) as small:
        with pytest.raises(ContextLengthExceeded, match="at most 50"):
            small("x" * 51, gen_config=GEN)
        assert small("x" * 50, gen_config=GEN).generate_token_len == 2


@pytest.fixture
def image_host() -> Iterator[tuple[str, list[str]]]:
    body, hits = png_bytes(), []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
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
    server.server_close()


def test_p7_text_over_session_len_is_refused_before_any_image_is_fetched(pipe, image_host):
    base, hits = image_host
    policy = MediaPolicy(allow_private_networks=True)
    content = [{"type": "image_url", "image_url": {"url": f"{base}/a.png"}},
               {"type": "text", "text": "word " * SESSION_LEN}]
    with pytest.raises(ContextLengthExceeded, match="text"):
        pipe.prepare_sync([{"role": "user", "content": content}], GEN, media_policy=policy)
    assert hits == []
    # text that fits alone, but not with the image's block
    per_tile = pipe.preparer.tokens_per_tile
    text_tokens = len(pipe.prepare_sync("word", GEN).token_ids) - 1 + 2  # template + <img></img>
    words = SESSION_LEN - text_tokens - max(1, per_tile // 2)
    content[1]["text"] = "word " * words
    assert words + text_tokens < SESSION_LEN <= words + text_tokens + per_tile
    with pytest.raises(ContextLengthExceeded, match="text and images"):
        pipe.prepare_sync([{"role": "user", "content": content}], GEN, media_policy=policy)
    assert hits == ["/a.png"]
    still_serves(pipe)


# ---- min_new_tokens ----------------------------------------------------------------------------


@pytest.mark.parametrize("gen", [
    GenerationConfig(max_new_tokens=2, min_new_tokens=3),
    GenerationConfig(min_new_tokens=SESSION_LEN),  # no max: the room session_len leaves
    GenerationConfig(max_new_tokens=10_000, min_new_tokens=SESSION_LEN - 2),
])
def test_min_new_tokens_beyond_what_can_be_generated_is_refused(pipe, gen):
    with pytest.raises(InvalidRequestError) as info:
        pipe("hello there", gen_config=gen)
    assert info.value.param == "min_new_tokens"
    still_serves(pipe)


def test_min_new_tokens_within_bounds_is_served(pipe):
    gen = GenerationConfig(max_new_tokens=3, min_new_tokens=3, ignore_eos=False)
    assert pipe("hello", gen_config=gen).generate_token_len == 3


# ---- L3: a cancelled request stops its download ------------------------------------------------


class _Trickle(http.server.BaseHTTPRequestHandler):
    """Sends an image's headers, then one byte every 50 ms; notes when the client hung up."""

    def do_GET(self):  # noqa: N802
        self.server.started.set()
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", "100000")
        self.end_headers()
        try:
            for _ in range(400):
                self.wfile.write(b"\x89")
                self.wfile.flush()
                time.sleep(0.05)
        except OSError:
            self.server.hung_up_at = time.monotonic()

    def log_message(self, *args):
        pass


@pytest.fixture
def trickle() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    server.started, server.hung_up_at = threading.Event(), None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def wait_hung_up(server, since: float) -> float:
    deadline = time.monotonic() + 5
    while server.hung_up_at is None:
        assert time.monotonic() < deadline, "the download went on"
        time.sleep(0.02)
    return server.hung_up_at - since


@pytest.mark.parametrize("wait", [0.0, 0.3])  # cancelled before the headers, or mid-body
def test_l3_cancel_stops_a_download_in_progress(trickle, wait):
    url = f"http://127.0.0.1:{trickle.server_address[1]}/slow.png"
    cancel, result = threading.Event(), {}

    def fetch() -> None:
        try:
            load_image(url, MediaPolicy(allow_private_networks=True, timeout_s=30), cancel)
        except ImageError as exc:
            result.update(code=exc.code, at=time.monotonic())

    worker = threading.Thread(target=fetch)
    worker.start()
    assert trickle.started.wait(5)
    time.sleep(wait)
    cancelled = time.monotonic()
    cancel.set()
    worker.join(5)
    assert result["code"] == "cancelled" and result["at"] - cancelled < 0.5
    assert wait_hung_up(trickle, cancelled) < 1.0


def test_l3_a_cancelled_prepare_stops_its_download(pipe, trickle):
    url = f"http://127.0.0.1:{trickle.server_address[1]}/slow.png"
    policy = MediaPolicy(allow_private_networks=True, timeout_s=30)
    prompt = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                           {"type": "text", "text": "what is it?"}]}]

    async def main() -> float:
        task = asyncio.ensure_future(pipe.prepare(prompt, GEN, media_policy=policy))
        while not trickle.started.is_set():
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        task.cancel()
        cancelled = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await task
        return cancelled

    cancelled = asyncio.run(main())
    assert wait_hung_up(trickle, cancelled) < 1.0  # not at the 30 s deadline
    still_serves(pipe)
