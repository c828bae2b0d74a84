"""What the server refuses before any expensive work, against the app around the FakePipeline:
prompt text over `max_prompt_chars` and conversations of more pieces than `session_len` (RELIABILITY
L15, P20, in every place text can be), text the tokenizer cannot encode (L17, in every field that
reaches the tokenizer, a file name or a URL), `min_tokens` beyond what can be generated, and the
memory of a large refused request handed back.

The real pipeline's side of the same checks is in tests/frontend/test_prompt_checks.py.
"""

from __future__ import annotations

import gc
import json
import os
import time
from collections.abc import Iterator

import httpx
import pytest
from fake_pipeline import FakePipeline
from serve_helpers import assert_error, chat, make_client, run_live

from vlmdeploy.frontend.limits import PROMPT_CHARS_PER_TOKEN
from vlmdeploy.serve import create_app, memory

URL = "/v1/chat/completions"
JSON = {"content-type": "application/json"}
CAP = 1000


def bodies(text: str) -> dict[str, tuple[str, dict]]:
    """One request per place a prompt's text can be."""
    hi = {"role": "user", "content": "hi"}
    return {
        "user": (URL, chat(text)),
        "system": (URL, {"messages": [{"role": "system", "content": text}, hi]}),
        "developer": (URL, {"messages": [{"role": "developer", "content": text}, hi]}),
        "assistant": (URL, {"messages": [hi, {"role": "assistant", "content": text}, hi]}),
        "text-part": (URL, chat([{"type": "text", "text": text}])),
        "split-parts": (URL, chat([{"type": "text", "text": text[: len(text) // 2]},
                                   {"type": "text", "text": text[len(text) // 2:]}])),
        "split-messages": (URL, {"messages": [{"role": "user", "content": text[:10]},
                                              {"role": "user", "content": text[10:]}]}),
        "completion": ("/v1/completions", {"prompt": text}),
        "completion-list": ("/v1/completions", {"prompt": [text[:10], text[10:]]}),
    }


PLACES = list(bodies("x" * 20))


# ---- L15 / P20: prompt size --------------------------------------------------------------------


@pytest.mark.parametrize("place", PLACES)
def test_l15_text_over_max_prompt_chars_is_refused_before_the_pipeline(fake, place):
    client = make_client(fake, max_prompt_chars=CAP)
    path, body = bodies("y" * (CAP + 1))[place]
    error = assert_error(client.post(path, json=body), 400, "context_length_exceeded")
    assert error["param"] in ("messages", "prompt") and str(CAP) in error["message"]
    assert fake.prepared == []
    path, body = bodies("y" * (CAP - 10))[place]  # the template's own text is not counted
    assert client.post(path, json=body).status_code == 200
    assert fake.prepared


def test_p20_the_default_cap_is_derived_from_session_len():
    fake = FakePipeline(session_len=256)
    client = make_client(fake)
    cap = PROMPT_CHARS_PER_TOKEN * 256
    assert_error(client.post(URL, json=chat("z" * (cap + 1), max_tokens=1)), 400,
                 "context_length_exceeded", "messages")
    assert fake.prepared == []
    client = make_client(fake, max_prompt_chars=cap * 2)  # the operator's flag wins
    client.post(URL, json=chat("z" * (cap + 1), max_tokens=1))
    assert len(fake.prepared) == 1


@pytest.mark.parametrize("shape", ["messages", "parts"])
def test_l15_more_pieces_than_session_len_are_refused(shape):
    fake = FakePipeline(session_len=100)
    client = make_client(fake)
    if shape == "messages":
        body = {"messages": [{"role": "user", "content": ""}] * 100}
    else:
        body = chat([{"type": "text", "text": ""}] * 99)
    assert_error(client.post(URL, json=body), 400, "context_length_exceeded", "messages")
    assert fake.prepared == []


def huge_body(head: bytes, mib: int) -> Iterator[bytes]:
    """A JSON body whose prompt is `mib` MiB of text, sent in pieces: the client side of the test
    never holds it whole, so the process's memory is the server's."""
    yield head
    piece = b"word " * (1 << 14)  # 80 KiB
    for _ in range(mib * (1 << 20) // len(piece)):
        yield piece
    yield b'"}]}' if b"messages" in head else b'"}'


def many_parts(count: int) -> Iterator[bytes]:
    """A chat body of `count` tiny text parts (about 27 bytes each), sent in pieces."""
    yield b'{"messages":[{"role":"user","content":['
    piece = b",".join([b'{"type":"text","text":"ab"}'] * 1000)
    for i in range(count // 1000):
        yield (b"," if i else b"") + piece
    yield b"]}]}"


def test_l15_tens_of_megabytes_are_refused_fast_and_the_memory_goes_back():
    """A 40 MiB prompt (under the 64 MiB body cap) is answered as soon as it has arrived, and the
    server's memory returns to where it was: the body is freed, and the heap trimmed. A body of a
    million tiny parts (the most objects a body can become) leaves some memory with Python's
    allocator, which the next such request reuses: repeated, it does not grow."""
    fake = FakePipeline()
    with run_live(create_app(fake)) as url, httpx.Client(base_url=url, timeout=60) as http:
        http.post(URL, json=chat("warm up"))
        gc.collect()
        before = rss_mib()
        for path, head in ((URL, b'{"messages":[{"role":"user","content":"'),
                           ("/v1/completions", b'{"prompt":"')):
            start = time.monotonic()
            response = http.post(path, content=huge_body(head, 40), headers=JSON)
            took = time.monotonic() - start
            assert_error(response, 400, "context_length_exceeded")
            assert took < 5.0, took  # the upload and the JSON parse; tokenising would take minutes
        time.sleep(5 * memory.TRIM_DELAY_S + 0.3)
        text_grew = rss_mib() - before
        grew = []
        for _ in range(3):
            assert_error(http.post(URL, content=many_parts(1_000_000), headers=JSON), 400,
                         "context_length_exceeded", "messages")
            time.sleep(5 * memory.TRIM_DELAY_S + 0.3)
            grew.append(rss_mib() - before)
    # measured (2 cores, glibc): text ~1 MiB; parts ~36 MiB once, then ~3-5 MiB with the trim
    # (~11-13 MiB and growing by 1 MiB a request without it)
    assert text_grew < 24, text_grew
    assert max(grew) < 64 and grew[-1] - grew[0] < 16, grew
    assert fake.prepared[1:] == []


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


@pytest.mark.skipif(memory._malloc_trim() is None, reason="the C library is not glibc")
def test_release_memory_is_limited_to_large_refusals(monkeypatch):
    import asyncio

    calls = []
    monkeypatch.setattr(memory, "_trim_once", lambda: calls.append(1))

    async def main(size: int) -> None:
        memory.release_memory_soon(size)
        await asyncio.sleep(memory.TRIM_DELAY_S * 3)

    asyncio.run(main(memory.TRIM_AFTER_BYTES - 1))
    assert calls == []
    asyncio.run(main(memory.TRIM_AFTER_BYTES))
    deadline = time.monotonic() + 2
    while not calls:
        assert time.monotonic() < deadline
        time.sleep(0.01)


# ---- L17: text that cannot be encoded ----------------------------------------------------------

LONE = ["\ud800", "a \udfff b", "\udbff", "\udc80"]


def surrogate_bodies(s: str) -> dict[str, tuple[str, dict]]:
    out = bodies(s + "x" * 20)
    image = {"type": "text", "text": "look"}
    out.update({
        "stop": (URL, chat("hi", stop=s)),
        "stop-list": (URL, chat("hi", stop=["fine", s])),
        "stop-stream": (URL, chat("hi", stop=[s], stream=True)),
        "completion-stop": ("/v1/completions", {"prompt": "hi", "stop": s}),
        "image-url": (URL, chat([image, {"type": "image_url", "image_url": {
            "url": f"https://example.com/{s}.png"}}])),
        "image-data-url": (URL, chat([image, {"type": "image_url", "image_url": {
            "url": f"data:image/png;base64,{s}AAAA"}}])),
        "image-path": (URL, chat([image, {"type": "image_url", "image_url": {
            "url": f"/srv/images/{s}.png"}}])),
        "file-url": (URL, chat([image, {"type": "image_url", "image_url": {
            "url": f"file:///srv/images/{s}.png"}}])),
    })
    return out


SURROGATE_PLACES = {
    "user": "messages[0].content", "system": "messages[0].content",
    "developer": "messages[0].content", "assistant": "messages[1].content",
    "text-part": "messages[0].content[0].text", "split-parts": "messages[0].content[0].text",
    "split-messages": "messages[0].content", "completion": "prompt",
    "completion-list": "prompt[0]", "stop": "stop[0]", "stop-list": "stop[1]",
    "stop-stream": "stop[0]", "completion-stop": "stop[0]",
    "image-url": "messages[0].content[1].image_url.url",
    "image-data-url": "messages[0].content[1].image_url.url",
    "image-path": "messages[0].content[1].image_url.url",
    "file-url": "messages[0].content[1].image_url.url",
}


@pytest.mark.parametrize("s", LONE, ids=["high", "low-in-text", "last-high", "escapable"])
@pytest.mark.parametrize("place", sorted(SURROGATE_PLACES))
def test_l17_lone_surrogates_are_400_naming_the_field(fake, place, s):
    client = make_client(fake, allowed_local_media_path="/srv/images")
    path, body = surrogate_bodies(s)[place]
    # ensure_ascii (json.dumps' default): the surrogate travels as a \ud800 escape
    response = client.post(path, content=json.dumps(body).encode(), headers=JSON)
    error = assert_error(response, 400, "invalid_encoding", SURROGATE_PLACES[place])
    assert error["type"] == "invalid_request_error"
    assert fake.prepared == []


def test_l17_surrogates_as_raw_bytes_are_400_too(client, fake):
    """CESU-8 bytes of a surrogate: Python's JSON parser reads them as the lone surrogate."""
    body = b'{"messages": [{"role": "user", "content": "a \xed\xa0\x80 b"}]}'
    assert_error(client.post(URL, content=body, headers=JSON), 400, "invalid_encoding",
                 "messages[0].content")
    assert fake.prepared == []


@pytest.mark.parametrize("body", [
    chat("hi", model="\ud800"),  # echoed in the 404's message
    chat("hi", user="\ud800", unknown_field="\udfff", **{"extra\ud800": 1}),  # ignored
    chat("hi", chat_template_kwargs={"\ud800": True}),  # named in the error's param
    chat("hi", tools=[{"type": "function", "function": {"name": "\ud800"}}]),  # refused
    chat("hi", response_format={"type": "\ud800"}),
])
def test_l17_surrogates_elsewhere_never_give_a_500(client, body):
    response = client.post(URL, content=json.dumps(body).encode(), headers=JSON)
    assert response.status_code < 500, response.text
    response.json()  # the answer is valid JSON and UTF-8, whatever the request quoted


def test_encodable_unicode_is_served(client, fake):
    body = chat("\U0001f600 emoji, 中文, é, \ufffd", stop=["\U0001f600"])
    assert client.post(URL, content=json.dumps(body).encode(), headers=JSON).status_code == 200
    assert len(fake.prepared) == 1


# ---- min_tokens --------------------------------------------------------------------------------


@pytest.mark.parametrize("path,body", [
    (URL, chat(min_tokens=5, max_tokens=2)),
    ("/v1/completions", {"prompt": "hi", "min_tokens": 5, "max_tokens": 2}),
    (URL, chat(min_tokens=4096)),  # the whole context, no max_tokens
    (URL, chat(min_tokens=10**6, max_tokens=10**6)),
    ("/v1/completions", {"prompt": "hi", "min_tokens": 4096, "max_tokens": None}),
    (URL, chat("hi " * 10, min_tokens=4090)),  # prompt + min_tokens over the context
])
def test_min_tokens_beyond_what_can_be_generated_is_400(client, path, body):
    assert_error(client.post(path, json=body), 400, None, "min_tokens")


def test_min_tokens_within_bounds_is_served(client, fake):
    assert client.post(URL, json=chat(min_tokens=2, max_tokens=2)).status_code == 200
    assert client.post(URL, json=chat(min_tokens=4000)).status_code == 200
    assert [p.gen_config.min_new_tokens for p in fake.prepared] == [2, 4000]
