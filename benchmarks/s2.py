"""S2: a server under load. W4's requests (``benchmarks/w4.py``) through ``/v1/chat/completions``
with Poisson arrivals, at each of several rates up to saturation: the latency–throughput curve.

Each request is streamed with its own W4 settings mapped to OpenAI's parameters (greedy →
``temperature: 0``; ``top_p``, ``top_k``, ``repetition_penalty``, ``seed``, ``ignore_eos``,
``max_tokens``). Arrivals follow a seeded exponential clock at the rate asked (``inf``: all at
once, the saturation point); nothing caps how many are in flight but the server. Per rate:
requests/s and output tokens/s over the wall time (first send to last answer), TTFT and TPOT
p50 / p99 (as ``benchmarks/serving.py`` measures them), failures.

    python -m benchmarks.s2 --url http://127.0.0.1:23333 --tokenizer /tmp/ivl8b-hf \\
        --rates 2,4,8,inf --num-requests 256 --json s2.json --csv results.csv
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks import results
from benchmarks.serving import Result, first_model, one_request
from benchmarks.w4 import W4Spec, w4_requests

# W4's GenerationConfig fields → OpenAI / vLLM request fields.
_FIELDS = {"max_new_tokens": "max_tokens", "top_p": "top_p", "top_k": "top_k",
           "repetition_penalty": "repetition_penalty", "random_seed": "seed",
           "ignore_eos": "ignore_eos"}


def body_of(messages: list[dict], gen: dict, model: str) -> dict:
    """An OpenAI chat request with a W4 request's messages and settings."""
    body = {"model": model, "messages": messages, "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": gen.get("temperature", 1.0) if gen.get("do_sample") else 0.0}
    body.update({_FIELDS[k]: v for k, v in gen.items() if k in _FIELDS})
    return body


def arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Send times (s from the start) of ``n`` Poisson arrivals at ``rate`` per second."""
    if math.isinf(rate):
        return [0.0] * n
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, n)
    return np.cumsum(gaps).tolist()


async def run_rate(client: httpx.AsyncClient, bodies: list[dict], rate: float,
                   seed: int) -> Result:
    start = time.perf_counter()

    async def at(t: float, body: dict):
        await asyncio.sleep(max(0.0, start + t - time.perf_counter()))
        return await one_request(client, body)

    samples = await asyncio.gather(*(at(t, b) for t, b in zip(arrivals(len(bodies), rate, seed),
                                                             bodies)))
    return Result(list(samples), time.perf_counter() - start)


async def run(args: argparse.Namespace,
              transport: httpx.AsyncBaseTransport | None = None) -> dict[str, dict]:
    from vlmdeploy.assets import resolve_model_path
    from vlmdeploy.frontend.tokenizer import Tokenizer

    tok = Tokenizer(args.tokenizer or resolve_model_path(None))
    base = args.url.rstrip("/")
    base = base if base.endswith("/v1") else base + "/v1"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    out: dict[str, dict] = {}
    async with httpx.AsyncClient(base_url=base + "/", headers=headers, timeout=None,
                                 limits=limits, transport=transport) as client:
        model = args.model or await first_model(client)
        args.model = model
        spec = W4Spec.for_session(args.session_len, args.num_requests)
        warm = w4_requests(tok, args.seed + 1000, W4Spec.for_session(args.session_len, 2))
        for messages, gen in warm:  # warm-up: compile, graphs, caches
            await one_request(client, body_of(messages, gen, model))
        for i, rate in enumerate(args.rates):
            reqs = w4_requests(tok, args.seed + 100 * i, spec)  # each rate its own images
            result = await run_rate(client, [body_of(m, g, model) for m, g in reqs], rate,
                                    args.seed + i)
            out[str(rate)] = result.summary() | {"rate": rate}
            print(f"rate {rate}: {json.dumps(out[str(rate)])}", flush=True)
    return out


def history_rows(curve: dict[str, dict], args: argparse.Namespace,
                 st: results.Stamp) -> list[dict]:
    units = {"req_per_s": ("requests_per_s", "req/s"),
             "output_tok_per_s": ("output_tokens_per_s", "tok/s"),
             "ttft_p50_ms": ("ttft_p50_ms", "ms"), "ttft_p99_ms": ("ttft_p99_ms", "ms"),
             "tpot_p50_ms": ("tpot_p50_ms", "ms"), "tpot_p99_ms": ("tpot_p99_ms", "ms"),
             "failed": ("failed_requests", "requests")}
    rows = []
    for rate, s in curve.items():
        note = (f"W4 mix, {s['requests']} requests, Poisson arrivals at {rate}/s; "
                f"server {args.model}")
        rows += [results.row(st, args.model_shape or "", f"S2@{rate}", metric, args.system,
                             s[key], unit, note)
                 for key, (metric, unit) in units.items() if np.isfinite(s[key])]
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:23333")
    p.add_argument("--model", default=None, help="model name (default: the first listed)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--tokenizer", default=None,
                   help="checkpoint whose tokenizer sizes the texts (default: the embedded model)")
    p.add_argument("--rates", default="2,4,8,inf",
                   type=lambda s: [float(x) for x in s.split(",")],
                   help="requests per second, comma-separated; inf: all at once")
    p.add_argument("--num-requests", type=int, default=256, help="per rate")
    p.add_argument("--session-len", type=int, default=8192,
                   help="the server's; a shorter one scales W4 down (W4Spec.for_session)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--csv", type=Path, default=None)
    p.add_argument("--system", default="vlmdeploy")
    p.add_argument("--model-shape", default=None)
    p.add_argument("--device-line", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    curve = asyncio.run(run(args))
    if args.json:
        args.json.write_text(json.dumps({"device": args.device_line, "curve": curve}, indent=2))
    if args.csv:
        results.append(args.csv, history_rows(curve, args, results.stamp(args.device_line or "")))
    return 0 if all(s["failed"] == 0 for s in curve.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
