"""The soak's request mix: what each request is, and what a right answer to it looks like.

Request ``i`` of a run is drawn from ``numpy.random.default_rng((seed, i))``, so any request a run
reports can be rebuilt alone (``build_case(i, ...)``). Kinds, by weight (``MIX``):

* valid work, answered 200: text chats (system prompts, multi-turn, ``n``, logprobs, seeds, stop
  strings), chats with one or two images (data URLs of assorted sizes and formats, most from a small
  pool so they repeat, some made fresh so no cache can hold them), text completions (one prompt or
  several); each streamed or not, streams with or without the usage chunk;
* clients that leave: streams closed after a few frames, requests cancelled after a few ms (before,
  during or after preparation and prefill), with long ``ignore_eos`` answers so the engine is still
  busy with them when they go;
* bad input, answered 4xx in OpenAI's envelope: malformed or non-object JSON, wrong content types,
  out-of-range parameters, unknown routes, methods and models, bad images (broken base64 or bytes,
  disallowed types, a decompression bomb's header, local paths, loopback URLs, too many images),
  text the tokenizer cannot encode (lone UTF-16 surrogates), prompts over the context, and bodies
  over the server's byte cap (sent on a raw socket: the server answers 413 while the body is still
  arriving and closes, which an HTTP client library reports as a write error).

Every URL in the mix points at 127.0.0.1 or ::1: refusing them must not connect anywhere, and if a
server did connect, nothing leaves the machine.
"""

from __future__ import annotations

import base64
import io
import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

JSON_CT = (("content-type", "application/json"),)
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
OK = frozenset({200})
BAD = frozenset({400})

# kind -> weight (per cent of the requests)
MIX: dict[str, int] = {
    "chat_text": 20, "chat_image": 17, "chat_images": 4, "completion": 11,
    "disconnect": 7, "abort": 7,
    "bad_json": 6, "bad_params": 10, "bad_image": 7, "bad_route": 3,
    "bad_text": 3, "too_long": 3, "oversize": 2,
}
WORDS = ("describe the image what colour is the circle where is the square how many stars are "
         "there left right top bottom center red green blue yellow triangle shapes").split()
POOL_SIZES = ((24, 24), (64, 48), (160, 400), (224, 224), (448, 448), (600, 300), (700, 700),
              (900, 500), (96, 96), (320, 240), (512, 128), (128, 512))
POOL_FORMATS = ("PNG", "JPEG", "WEBP")


@dataclass(frozen=True)
class Case:
    """One request and what a right answer to it is."""

    index: int
    kind: str
    path: str
    body: bytes | None = None
    method: str = "POST"
    headers: tuple[tuple[str, str], ...] = JSON_CT
    expect: frozenset[int] = OK  # statuses that are right for this request
    stream: bool = False
    choices: int = 1  # choices a 200 must carry
    usage_chunk: bool = False  # a stream must end with a usage chunk
    action: str = "complete"  # "complete" | "disconnect" (after `after` frames) | "abort"
    after: float = 0.0  # frames read before hanging up, or seconds before cancelling
    declared_bytes: int = 0  # > 0: a raw-socket request declaring this Content-Length


@dataclass
class MixContext:
    """What the builders need: the served model, its context length, the image pool."""

    model: str
    session_len: int
    oversize_bytes: int
    pool: list[str] = field(default_factory=list)


def data_url(raw: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def encode(image: Image.Image, fmt: str) -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 85} if fmt != "PNG" else {}))
    return data_url(buf.getvalue(), f"image/{fmt.lower()}")


def smooth_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth random colour field: compresses like a photo, unlike noise."""
    small = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), "RGB")
    return small.resize((width, height), Image.BICUBIC)


def image_pool(seed: int) -> list[str]:
    """The repeated images: every size once, formats in turn."""
    rng = np.random.default_rng((seed, 1 << 40))
    return [encode(smooth_image(rng, w, h), POOL_FORMATS[i % len(POOL_FORMATS)])
            for i, (w, h) in enumerate(POOL_SIZES)]


def fresh_image(rng: np.random.Generator) -> str:
    """An image no cache has seen: small random noise."""
    side = int(rng.integers(16, 97))
    return encode(Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)), "PNG")


def pick_image(rng: np.random.Generator, ctx: MixContext) -> str:
    return fresh_image(rng) if rng.random() < 0.3 else ctx.pool[int(rng.integers(len(ctx.pool)))]


def text(rng: np.random.Generator, low: int = 3, high: int = 40) -> str:
    picks = rng.integers(0, len(WORDS), int(rng.integers(low, high)))
    return " ".join(WORDS[int(j)] for j in picks)


def dumps(body: Any) -> bytes:
    # ensure_ascii: lone surrogates travel as \\ud800 escapes, the way a JSON client sends them
    return json.dumps(body, ensure_ascii=True).encode()


def sampling(rng: np.random.Generator, chat: bool) -> tuple[dict[str, Any], int]:
    """Random valid sampling parameters, and the number of choices they ask for."""
    params: dict[str, Any] = {"max_tokens": int(rng.integers(1, 17))}
    if rng.random() < 0.5:
        params["temperature"] = 0
    else:
        params.update(temperature=0.7, top_p=0.9, seed=int(rng.integers(0, 1 << 31)))
    n = 2 if rng.random() < 0.15 else 1
    if n > 1:
        params["n"] = n
    if rng.random() < 0.1:
        params.update({"logprobs": True, "top_logprobs": 2} if chat else {"logprobs": 2})
    if rng.random() < 0.1:
        params["stop"] = ["e", "o r"]
    if rng.random() < 0.2:
        params["ignore_eos"] = True
    return params, n


def streaming(rng: np.random.Generator, body: dict[str, Any]) -> tuple[bool, bool]:
    """Makes half the requests streams, half of those with the usage chunk."""
    if rng.random() < 0.5:
        return False, False
    body["stream"] = True
    usage = bool(rng.random() < 0.5)
    if usage:
        body["stream_options"] = {"include_usage": True}
    return True, usage


def chat_case(i: int, kind: str, rng: np.random.Generator, ctx: MixContext,
              messages: list[dict[str, Any]]) -> Case:
    params, n = sampling(rng, chat=True)
    body = {"model": ctx.model, "messages": messages, **params}
    stream, usage = streaming(rng, body)
    return Case(i, kind, CHAT, dumps(body), stream=stream, choices=n, usage_chunk=usage)


def chat_text(i: int, rng: np.random.Generator, ctx: MixContext) -> Case:
    messages = [{"role": "user", "content": text(rng)}]
    if rng.random() < 0.2:
        messages.insert(0, {"role": "system", "content": text(rng)})
    if rng.random() < 0.15:
        messages += [{"role": "assistant", "content": text(rng, 1, 6)},
                     {"role": "user", "content": text(rng)}]
    return chat_case(i, "chat_text", rng, ctx, messages)


def image_message(rng: np.random.Generator, ctx: MixContext, images: int) -> dict[str, Any]:
    parts = [{"type": "image_url", "image_url": {"url": pick_image(rng, ctx)}}
             for _ in range(images)]
    parts.insert(int(rng.integers(0, images + 1)), {"type": "text", "text": text(rng, 2, 12)})
    return {"role": "user", "content": parts}


def chat_image(i: int, rng: np.random.Generator, ctx: MixContext) -> Case:
    return chat_case(i, "chat_image", rng, ctx, [image_message(rng, ctx, 1)])


def chat_images(i: int, rng: np.random.Generator, ctx: MixContext) -> Case:
    return chat_case(i, "chat_images", rng, ctx, [image_message(rng, ctx, 2)])


def completion(i: int, rng: np.random.Generator, ctx: MixContext) -> Case:
    prompts = [text(rng) for _ in range(2 if rng.random() < 0.2 else 1)]
    params, n = sampling(rng, chat=False)
    body = {"model": ctx.model, "prompt": prompts if len(prompts) > 1 else prompts[0], **params}
    stream, usage = streaming(rng, body)
    return Case(i, "completion", COMPLETIONS, dumps(body), stream=stream,
                choices=n * len(prompts), usage_chunk=usage)


def long_chat(rng: np.random.Generator, ctx: MixContext, stream: bool) -> dict[str, Any]:
    """A request the engine is still busy with when its client leaves."""
    message = image_message(rng, ctx, 1) if rng.random() < 0.3 else {
        "role": "user", "content": text(rng)}
    return {"model": ctx.model, "messages": [message], "max_tokens": int(rng.integers(64, 257)),
            "ignore_eos": True, "temperature": 0, "stream": stream}


def disconnect(i: int, rng: np.random.Generator, ctx: MixContext) -> Case:
    body = long_chat(rng, ctx, stream=True)
    return Case(i, "disconnect", CHAT, dumps(body), stream=True, action="disconnect",
                after=int(rng.integers(1, 6)))


def abort(i: int, rng: np.random.Generator, ctx: MixContext) -> Case:
    stream = bool(rng.random() < 0.3)
    if rng.random() < 0.3:
        body: dict[str, Any] = {"model": ctx.model, "prompt": text(rng), "ignore_eos": True,
                                "max_tokens": int(rng.integers(64, 257)), "stream": stream}
        path = COMPLETIONS
    else:
        body, path = long_chat(rng, ctx, stream), CHAT
    return Case(i, "abort", path, dumps(body), stream=stream, action="abort",
                after=float(rng.uniform(0.002, 0.4)))


def _chat_body(ctx: MixContext, **params: Any) -> dict[str, Any]:
    return {"model": ctx.model, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4, **params}


def bad_json(i: int, rng: np.random.Generator, ctx: MixContext) -> Case:
    good = dumps(_chat_body(ctx))
    cases: list[tuple[bytes, str, int]] = [
        (b"not json", "application/json", 400),
        (good[: len(good) // 2], "application/json", 400),  # truncated
        (b"[1, 2]", "application/json", 400),
        (b'"hello"', "application/json", 400),
        (b"", "application/json", 400),
        (b"\xff\xfe{", "application/json", 400),
        (good[:-1] + b', "temperature": NaN}', "application/json", 400),
        (b"[" * 100_000, "application/json", 400),
        (good, "text/plain", 415),
        (b"messages=hi", "application/x-www-form-urlencoded", 415),
    ]
    body, ctype, status = cases[int(rng.integers(len(cases)))]
    return Case(i, "bad_json", CHAT, body, headers=(("content-type", ctype),),
                expect=frozenset({status}))


def bad_params(i: int, rng: np.random.Generator, ctx: MixContext) -> Case:
    chat = lambda **kw: _chat_body(ctx, **kw)
    msgs = lambda messages: {"model": ctx.model, "messages": messages}
    pattern_tool = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "pattern": "("}}}}}]
    chats = [
        chat(n=0), chat(n=10**9), chat(temperature=-1), chat(temperature=3), chat(top_p=0),
        chat(top_p=1.5), chat(top_k=-2), chat(max_tokens=0), chat(max_tokens=-1),
        chat(max_tokens="10"), chat(max_tokens=10.5), chat(logprobs=True, top_logprobs=10**6),
        chat(stop=["x"] * 10_000), chat(stop="y" * 100_000), chat(logit_bias={"abc": 1}),
        chat(logit_bias={"1": 1e9}), chat(seed=2**64), chat(seed=-1), chat(tools=pattern_tool),
        chat(response_format={"type": "json_schema", "json_schema": {"pattern": "(a+)+$"}}),
        chat(chat_template="{{ 7 * 7 }}"), chat(chat_template_kwargs={"tokenize": True}),
        chat(stream_options={"include_usage": True}), chat(min_tokens=5, max_tokens=2),
        chat(presence_penalty=3), chat(repetition_penalty=0), msgs([]), msgs("hi"),
        msgs([{"content": "hi"}]), msgs([{"role": "hacker", "content": "hi"}]),
        msgs([{"role": "user", "content": None}]),
        msgs([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "x"}}]}]),
    ]
    completions = [{"model": ctx.model, "prompt": []}, {"model": ctx.model, "prompt": ["a"] * 65},
                   {"model": ctx.model, "prompt": "x", "echo": True},
                   {"model": ctx.model, "prompt": "x", "n": 17},
                   {"model": ctx.model, "prompt": "x", "logprobs": 21}]
    j = int(rng.integers(len(chats) + len(completions)))
    if j < len(chats):
        return Case(i, "bad_params", CHAT, dumps(chats[j]), expect=BAD)
    return Case(i, "bad_params", COMPLETIONS, dumps(completions[j - len(chats)]), expect=BAD)


def bad_route(i: int, rng: np.random.Generator, ctx: MixContext) -> Case:
    cases = [
        Case(i, "bad_route", "/v1/nope", method="GET", expect=frozenset({404})),
        Case(i, "bad_route", CHAT, method="GET", expect=frozenset({405})),
        Case(i, "bad_route", "/v1/models", dumps({}), expect=frozenset({405})),
        Case(i, "bad_route", "/v1/models/no-such-model", method="GET", expect=frozenset({404})),
        Case(i, "bad_route", CHAT, dumps({**_chat_body(ctx), "model": "no-such-model"}),
             expect=frozenset({404})),
    ]
    return cases[int(rng.integers(len(cases)))]


def bomb_png() -> bytes:
    """An 8x8 PNG whose header claims 50,000 x 50,000 pixels (with a valid chunk CRC)."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format="PNG")
    raw = bytearray(buf.getvalue())
    raw[16:24] = (50_000).to_bytes(4, "big") * 2
    raw[29:33] = zlib.crc32(bytes(raw[12:29])).to_bytes(4, "big")
    return bytes(raw)


def bad_image(i: int, rng: np.random.Generator, ctx: MixContext) -> Case:
    png = base64.b64decode(ctx.pool[0].split(",", 1)[1])
    urls = [
        "data:image/png;base64,@@@not-base64@@@", "data:image/png;base64,iVBORw0KGgo",
        data_url(b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml"),
        data_url(b"%PDF-1.4", "application/pdf"), data_url(png[: len(png) // 2], "image/png"),
        data_url(b"hello world" * 10, "image/png"), data_url(bomb_png(), "image/png"),
        "/etc/passwd", "file:///etc/passwd", "../../x.png", "http://127.0.0.1:9/a.png",
        "http://[::1]:9/a.png", "http://0x7f000001:9/a.png", "ftp://127.0.0.1:9/a.png",
    ]
    j = int(rng.integers(len(urls) + 1))
    if j < len(urls):
        parts = [{"type": "image_url", "image_url": {"url": urls[j]}}]
    else:  # more images than the server takes (its default limit is 32)
        parts = [{"type": "image_url", "image_url": {"url": ctx.pool[0]}}] * 33
    body = {"model": ctx.model, "max_tokens": 4,
            "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "hi"}]}]}
    return Case(i, "bad_image", CHAT, dumps(body), expect=BAD)


def bad_text(i: int, rng: np.random.Generator, ctx: MixContext) -> Case:
    """Lone UTF-16 surrogates, which no tokenizer can encode, in each string field that reaches
    the tokenizer, the stop matcher or the file system."""
    s = "\ud800" if rng.random() < 0.5 else "x \udfff y"
    chat = lambda messages, **kw: (CHAT, {"model": ctx.model, "messages": messages,
                                          "max_tokens": 4, **kw})
    cases = [
        chat([{"role": "user", "content": s}]),
        chat([{"role": "system", "content": s}, {"role": "user", "content": "hi"}]),
        chat([{"role": "user", "content": [{"type": "text", "text": s}]}]),
        chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": s},
              {"role": "user", "content": "hi"}]),
        chat([{"role": "user", "content": "hi"}], stop=[s]),
        chat([{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": f"/tmp/{s}.png"}}]}]),
        (COMPLETIONS, {"model": ctx.model, "prompt": s, "max_tokens": 4}),
        (COMPLETIONS, {"model": ctx.model, "prompt": ["ok", s], "max_tokens": 4}),
    ]
    path, body = cases[int(rng.integers(len(cases)))]
    return Case(i, "bad_text", path, dumps(body), expect=BAD)


def too_long(i: int, rng: np.random.Generator, ctx: MixContext) -> Case:
    """A prompt longer than the context (twice ``session_len`` words): in a chat message, a system
    message, beside an image, or as a completion prompt. (``max_tokens`` past the context is not
    refused: generation is clamped to ``session_len``, finish_reason ``length``.)"""
    long = "word " * (2 * ctx.session_len)
    image = {"type": "image_url", "image_url": {"url": ctx.pool[4]}}
    chats = [[{"role": "user", "content": long}],
             [{"role": "system", "content": long}, {"role": "user", "content": "hi"}],
             [{"role": "user", "content": [image, {"type": "text", "text": long}]}]]
    j = int(rng.integers(len(chats) + 1))
    if j == len(chats):
        body = {"model": ctx.model, "prompt": long, "max_tokens": 4}
        return Case(i, "too_long", COMPLETIONS, dumps(body), expect=BAD)
    body = {"model": ctx.model, "messages": chats[j], "max_tokens": 4}
    return Case(i, "too_long", CHAT, dumps(body), expect=BAD)


def oversize(i: int, rng: np.random.Generator, ctx: MixContext) -> Case:
    return Case(i, "oversize", CHAT, None, expect=frozenset({413}),
                declared_bytes=ctx.oversize_bytes + int(rng.integers(1, 4096)))


def warmup_case(i: int, seed: int, ctx: MixContext) -> Case:
    """A request that fills the server's image-embedding cache: a fresh 896 x 896 image (five
    448-pixel tiles with the thumbnail) that no other request carries, and one output token."""
    rng = np.random.default_rng((seed, 1 << 41, i))
    url = encode(smooth_image(rng, 896, 896), "PNG")
    parts = [{"type": "image_url", "image_url": {"url": url}},
             {"type": "text", "text": "Describe the image."}]
    body = {"model": ctx.model, "max_tokens": 1, "messages": [{"role": "user", "content": parts}]}
    return Case(i, "warmup", CHAT, dumps(body))


BUILDERS: dict[str, Callable[[int, np.random.Generator, MixContext], Case]] = {
    "chat_text": chat_text, "chat_image": chat_image, "chat_images": chat_images,
    "completion": completion, "disconnect": disconnect, "abort": abort, "bad_json": bad_json,
    "bad_params": bad_params, "bad_image": bad_image, "bad_route": bad_route,
    "bad_text": bad_text, "too_long": too_long, "oversize": oversize,
}


def build_case(i: int, seed: int, ctx: MixContext, mix: dict[str, int] | None = None) -> Case:
    """Request ``i`` of the run with ``seed``."""
    mix = mix or MIX
    rng = np.random.default_rng((seed, i))
    kinds = sorted(mix)
    weights = np.array([mix[k] for k in kinds], dtype=float)
    kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
    return BUILDERS[kind](i, rng, ctx)
