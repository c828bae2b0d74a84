"""W4, mixed traffic: what a deployed server sees, as one seeded list of requests.

Each request draws, independently (``W4Spec`` holds every share and range):

* **images**: none (10%), one (55%), two (20%), three (10%) or four (5%); each of a size from
  ``SIZES`` — a 224-px thumbnail, 448 and 1024 squares, 4:3 and 16:9 photos, a 6:1 banner, a 1:5
  scroll — so tile counts run from 1 to 13 (12 + thumbnail), extreme aspect ratios included;
  at most ``max_tiles`` (16) tiles per request (images beyond it are left out);
* **text**: a log-uniform token count in [20, 2000];
* **output**: a log-uniform token count in [16, 1024], generated to the end (``ignore_eos``,
  so both systems produce the same amount of work on random weights);
* **sampling**: greedy (30%) or sampled with its own seed, temperature in [0.3, 1.2], top-p in
  [0.8, 1.0], top-k of 0 / 20 / 50, and a repetition penalty of 1.05 for a fifth of them;
* **sharing**: 15% reuse an image of an earlier request (the embedding cache), 20% start with
  one of four system prompts of ~300 tokens (the prefix cache, where on), and 10% are a second
  turn of an earlier request (its messages, a fixed answer, a new question).

Everything is plain data (OpenAI-style messages with base64 ``data:`` URLs, and a dict of
LMDeploy ``GenerationConfig`` fields), so a harness for another engine runs the same list.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from benchmarks.workloads import jpeg_url_of, text_of
from vlmdeploy.vl.tiling import num_tiles

# (width, height): a thumbnail, squares, photos, a banner, a scroll.
SIZES = [(224, 224), (448, 448), (1024, 1024), (1024, 768), (1280, 720), (1920, 320), (300, 1500)]
IMAGE_COUNTS = ([0, 1, 2, 3, 4], [0.10, 0.55, 0.20, 0.10, 0.05])


@dataclass(frozen=True)
class W4Spec:
    requests: int = 256
    # per request: 4,096 image tokens at most, so that with the longest text, a system prompt and
    # the longest output every request (a follow-up too) fits an 8,192-token session
    max_tiles: int = 16
    text_tokens: tuple[int, int] = (20, 2000)
    output_tokens: tuple[int, int] = (16, 1024)
    greedy_share: float = 0.30
    repeat_image_share: float = 0.15
    system_prompt_share: float = 0.20
    follow_up_share: float = 0.10
    system_prompt_tokens: int = 300

    @classmethod
    def for_session(cls, session_len: int, requests: int) -> W4Spec:
        """The mix scaled to a session shorter than 8,192 tokens (the lengths and the tile cap
        shrink in proportion; the shares stay): for small test runs."""
        f = min(1.0, session_len / 8192)
        return cls(requests=requests, max_tiles=max(1, int(16 * f)),
                   text_tokens=(20, max(21, int(2000 * f))),
                   output_tokens=(16, max(17, int(1024 * f))),
                   system_prompt_tokens=max(1, int(300 * f)))


def tiles_of(width: int, height: int) -> int:
    """Tiles InternVL's dynamic tiling makes of an image (default limits, thumbnail included)."""
    return num_tiles(width, height)


def _log_uniform(rng: np.random.Generator, lo: int, hi: int) -> int:
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


def _sampling(rng: np.random.Generator, spec: W4Spec, n_out: int) -> dict:
    fields: dict = {"max_new_tokens": n_out, "ignore_eos": True}
    if rng.random() < spec.greedy_share:
        return fields
    return fields | {
        "do_sample": True,
        "temperature": round(float(rng.uniform(0.3, 1.2)), 3),
        "top_p": round(float(rng.uniform(0.8, 1.0)), 3),
        "top_k": int(rng.choice([0, 20, 50])),
        "repetition_penalty": 1.05 if rng.random() < 0.2 else 1.0,
        "random_seed": int(rng.integers(2**31)),
    }


def w4_requests(tok, seed: int, spec: W4Spec = W4Spec()) -> list[tuple[list[dict], dict]]:
    """``spec.requests`` requests: (OpenAI-style messages, GenerationConfig fields)."""
    rng = np.random.default_rng(seed)
    systems = [text_of(tok, spec.system_prompt_tokens, rng) for _ in range(4)]
    urls: list[str] = []  # every image made so far, for repeats
    out: list[tuple[list[dict], dict]] = []
    for _ in range(spec.requests):
        n_out = _log_uniform(rng, *spec.output_tokens)
        if out and rng.random() < spec.follow_up_share:  # a second turn of an earlier request
            earlier, _ = out[int(rng.integers(len(out)))]
            messages = [*earlier, {"role": "assistant", "content": "Here is what I see."},
                        {"role": "user", "content": text_of(tok, 40, rng)}]
            out.append((messages, _sampling(rng, spec, n_out)))
            continue
        parts, tiles = [], 0
        for _ in range(int(rng.choice(IMAGE_COUNTS[0], p=IMAGE_COUNTS[1]))):
            if urls and rng.random() < spec.repeat_image_share:
                url, size = urls[int(rng.integers(len(urls)))]
            else:
                size = SIZES[int(rng.integers(len(SIZES)))]
                url = jpeg_url_of(size, rng)
                urls.append((url, size))
            if tiles + tiles_of(*size) > spec.max_tiles:
                break
            tiles += tiles_of(*size)
            parts.append({"type": "image_url", "image_url": {"url": url}})
        parts.append({"type": "text", "text": text_of(tok, _log_uniform(rng, *spec.text_tokens),
                                                       rng)})
        messages = [{"role": "user", "content": parts}]
        if rng.random() < spec.system_prompt_share:
            messages.insert(0, {"role": "system", "content": systems[int(rng.integers(4))]})
        out.append((messages, _sampling(rng, spec, n_out)))
    return out


def summary(requests: list[tuple[list[dict], dict]]) -> dict:
    """What a list holds: counts that document a run (images, tiles, tokens asked for)."""
    images = [p for m, _ in requests for msg in m if isinstance(msg["content"], list)
              for p in msg["content"] if p["type"] == "image_url"]
    return {
        "requests": len(requests),
        "images": len(images),
        "distinct_images": len({p["image_url"]["url"] for p in images}),
        "follow_ups": sum(any(msg["role"] == "assistant" for msg in m) for m, _ in requests),
        "sampled": sum(g.get("do_sample", False) for _, g in requests),
        "output_tokens": sum(g["max_new_tokens"] for _, g in requests),
    }
