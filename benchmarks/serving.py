"""S1 serving benchmark (DESIGN §5) against any OpenAI-compatible server.

W2's requests through `/v1/chat/completions`: each request carries its own 1024x1024 JPEG as a
base64 data URL plus ~100 text tokens and asks for 100 tokens with `ignore_eos` (greedy), streamed
with `stream_options.include_usage`; 64 requests are in flight at a time. Token counts come from the
server's `usage`, never from counting chunks. Per request, TTFT is the time to the first chunk with
text and TPOT is (end of stream - first text) / (completion_tokens - 1). Images are encoded before
the clock starts, so the client's own work is not measured.

    python -m benchmarks.serving --url http://127.0.0.1:23333 \\
        --device-line "$(nvidia-smi --query-gpu=name --format=csv,noheader)" --csv results.csv

Prints a markdown row (and appends it, under a header written once, with `--append`); `--csv`
appends the run's numbers to a results CSV (see `benchmarks/results.py`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import io
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from benchmarks import results

HEADER = (
    "| date | device | server / model | requests | concurrency | req/s | output tok/s "
    "| TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) | TPOT p99 (ms) | failed |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)
WORDS = (
    "please look at the picture carefully and describe every object you can see its colour "
    "its position relative to the other objects and what the scene as a whole suggests about "
    "the place the time of day and the people who might have taken it then list three "
    "questions a curious child could ask about it and answer each of them briefly in plain "
    "words"
).split()


@dataclass
class Sample:
    ok: bool
    ttft: float = 0.0
    tpot: float | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    error: str = ""


@dataclass
class Result:
    samples: list[Sample] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def good(self) -> list[Sample]:
        return [s for s in self.samples if s.ok]

    @property
    def failed(self) -> int:
        return len(self.samples) - len(self.good)

    def percentile(self, values: list[float], q: float) -> float:
        return float(np.percentile(values, q)) if values else float("nan")

    def summary(self) -> dict[str, float]:
        good = self.good
        ttft = [s.ttft * 1e3 for s in good]
        tpot = [s.tpot * 1e3 for s in good if s.tpot is not None]
        return {
            "requests": len(self.samples),
            "failed": self.failed,
            "req_per_s": len(good) / self.wall_s if self.wall_s else 0.0,
            "output_tok_per_s": sum(s.completion_tokens for s in good) / self.wall_s
            if self.wall_s
            else 0.0,
            "mean_prompt_tokens": float(np.mean([s.prompt_tokens for s in good])) if good else 0.0,
            "ttft_p50_ms": self.percentile(ttft, 50),
            "ttft_p99_ms": self.percentile(ttft, 99),
            "tpot_p50_ms": self.percentile(tpot, 50),
            "tpot_p99_ms": self.percentile(tpot, 99),
        }


def make_image(index: int, size: int) -> str:
    """A distinct, JPEG-compressible image per request: smooth random colour fields."""
    rng = np.random.default_rng(index)
    small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    small.resize((size, size), Image.BICUBIC).save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def make_body(index: int, model: str, image_url: str, max_tokens: int, words: int) -> dict:
    text = f"Request {index}: " + " ".join(WORDS[i % len(WORDS)] for i in range(words))
    return {
        "model": model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_url}},
                    {"type": "text", "text": text},
                ],
            }
        ],
    }


async def one_request(client: httpx.AsyncClient, body: dict) -> Sample:
    start = time.perf_counter()
    first, usage = None, None
    try:
        async with client.stream("POST", "chat/completions", json=body) as response:
            if response.status_code != 200:
                return Sample(
                    False, error=f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                )
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                if "error" in chunk:
                    return Sample(False, error=str(chunk["error"])[:200])
                delta = chunk["choices"][0]["delta"] if chunk.get("choices") else {}
                if first is None and (delta.get("content") or delta.get("reasoning_content")):
                    first = time.perf_counter()
                usage = chunk.get("usage") or usage
    except httpx.HTTPError as exc:
        return Sample(False, error=f"{type(exc).__name__}: {exc}")
    end = time.perf_counter()
    if first is None or usage is None:
        return Sample(False, error="no text or no usage in the stream")
    tokens = usage["completion_tokens"]
    tpot = (end - first) / (tokens - 1) if tokens > 1 else None
    return Sample(True, first - start, tpot, tokens, usage["prompt_tokens"])


async def first_model(client: httpx.AsyncClient) -> str:
    response = await client.get("models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]


async def run(
    args: argparse.Namespace, transport: httpx.AsyncBaseTransport | None = None
) -> Result:
    base = args.url.rstrip("/")
    base = base if base.endswith("/v1") else base + "/v1"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(
        max_connections=args.concurrency, max_keepalive_connections=args.concurrency
    )
    async with httpx.AsyncClient(
        base_url=base + "/", headers=headers, timeout=None, limits=limits, transport=transport
    ) as client:
        model = args.model or await first_model(client)
        args.model = model
        images = [make_image(i, args.image_size) for i in range(args.num_requests + args.warmup)]
        bodies = [
            make_body(i, model, url, args.max_tokens, args.words) for i, url in enumerate(images)
        ]
        for body in bodies[args.num_requests :]:  # warm-up: compile, graphs, caches
            await one_request(client, body)
        gate = asyncio.Semaphore(args.concurrency)

        async def limited(body: dict) -> Sample:
            async with gate:
                return await one_request(client, body)

        start = time.perf_counter()
        samples = await asyncio.gather(*(limited(b) for b in bodies[: args.num_requests]))
        return Result(list(samples), time.perf_counter() - start)


def markdown_row(result: Result, args: argparse.Namespace) -> str:
    s = result.summary()
    cells = [
        datetime.date.today().isoformat(),
        args.device_line or "-",
        f"{args.url} / {args.model}",
        str(s["requests"]),
        str(args.concurrency),
        f"{s['req_per_s']:.2f}",
        f"{s['output_tok_per_s']:.0f}",
        f"{s['ttft_p50_ms']:.0f}",
        f"{s['ttft_p99_ms']:.0f}",
        f"{s['tpot_p50_ms']:.1f}",
        f"{s['tpot_p99_ms']:.1f}",
        str(s["failed"]),
    ]
    return "| " + " | ".join(cells) + " |\n"


def append_row(path: Path, row: str) -> None:
    text = path.read_text() if path.exists() else ""
    with path.open("a") as out:
        if HEADER.splitlines()[0] not in text:
            out.write(
                ("\n" if text and not text.endswith("\n\n") else "")
                + "## S1 serving (DESIGN §5)\n\n"
                + HEADER
            )
        out.write(row)


def history_rows(result: Result, args: argparse.Namespace, st: results.Stamp) -> list[dict]:
    """The run's rows for the results history."""
    s = result.summary()
    note = (f"{s['requests']} requests at concurrency {args.concurrency}, {args.max_tokens} "
            f"output tokens; server {args.model}")
    units = {"req_per_s": ("requests_per_s", "req/s"),
             "output_tok_per_s": ("output_tokens_per_s", "tok/s"),
             "ttft_p50_ms": ("ttft_p50_ms", "ms"), "ttft_p99_ms": ("ttft_p99_ms", "ms"),
             "tpot_p50_ms": ("tpot_p50_ms", "ms"), "tpot_p99_ms": ("tpot_p99_ms", "ms"),
             "failed": ("failed_requests", "requests")}
    return [results.row(st, args.model_shape or "", "S1", metric, args.system, s[key], unit, note)
            for key, (metric, unit) in units.items() if np.isfinite(s[key])]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:23333", help="server base URL")
    p.add_argument("--model", default=None, help="model name (default: the first listed)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=100)
    p.add_argument("--image-size", type=int, default=1024)
    p.add_argument("--words", type=int, default=75, help="text words per prompt (~100 tokens)")
    p.add_argument("--warmup", type=int, default=2, help="requests sent before measuring")
    p.add_argument("--device-line", default=None, help="device description for the table")
    p.add_argument("--append", type=Path, default=None, help="markdown file to append the row to")
    p.add_argument("--csv", type=Path, default=None, help="results CSV to append the run's rows to")
    p.add_argument("--system", default="vlmdeploy", help="the server's name in the results CSV")
    p.add_argument("--model-shape", default=None, help="the architecture's name in the results CSV")
    p.add_argument("--json", type=Path, default=None, help="also write the summary as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = asyncio.run(run(args))
    summary = result.summary()
    print(json.dumps(summary, indent=2))
    for sample in [s for s in result.samples if not s.ok][:5]:
        print("failed:", sample.error, file=sys.stderr)
    row = markdown_row(result, args)
    print(HEADER + row, end="")
    if args.append:
        append_row(args.append, row)
    if args.csv:
        results.append(args.csv, history_rows(result, args, results.stamp(args.device_line or "")))
    if args.json:
        args.json.write_text(json.dumps({**summary, "device": args.device_line}, indent=2))
    return 0 if result.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
