"""Soak: thousands of mixed requests against the real server, then the invariants a server that
never falls over keeps.

Without ``--url`` the soak starts ``vlmdeploy serve api_server`` (the embedded default model unless
``--model``) as a subprocess on 127.0.0.1 with an ephemeral port, and stops it at the end
(SIGTERM). With ``--url`` it soaks a running server (``--pid`` to sample that process's
memory). All traffic is loopback; the run is bounded by ``--requests`` and ``--seconds``, and each
request by ``--timeout``. The mix is in ``benchmarks/soak_mix.py``, the checks in
``benchmarks/soak_checks.py``, sending in ``soak_send.py``, the own server in ``soak_server.py``,
the report in ``soak_report.py``.

Invariants (the run fails, exit 1, when one does not hold):

* every answer well-formed: no violation of any class (``soak_checks.VIOLATIONS``);
* no leaked KV blocks: once the load has drained, ``/metrics`` shows ``vllm:num_requests_running``,
  ``vllm:num_requests_waiting`` and ``vllm:kv_cache_usage_perc`` all 0 (within ``--drain-s``);
* healthy after: ``/health`` answers 200 and one more request is served well-formed;
* flat memory: the server's RSS after the drain is at most its RSS at 20% of the run plus 10% plus
  64 MiB (``--rss-tolerance``, ``--rss-slack-mib``): the first fifth is warm-up (allocator pools,
  the first image of each size), growth after it is a leak. The image-embedding cache, bounded
  but filled only by new images, is filled before the run starts (``--warmup`` requests of fresh
  five-tile images, not counted in the run but checked like it). With
  ``--gpu-memory``, GPU memory used (``nvidia-smi``, all GPUs) at the end is at most its value at
  20% plus ``--gpu-slack-mib`` (512 MiB: the KV cache is allocated up front, nothing should grow);
* a clean stop (own server only): SIGTERM ends it within 30 s with exit code 0, or -15 (uvicorn
  re-raises the signal once its graceful shutdown is done).

    python -m benchmarks.soak                                   # 10,000 requests, own server
    python -m benchmarks.soak --requests 300 --warmup 0          # the CI size
    python -m benchmarks.soak --url http://127.0.0.1:23333 --pid 1234 --gpu-memory \\
        --requests 1000000 --seconds 300 --model-shape InternVL3.5-8B --csv results.csv

``--csv`` appends the run's rows (workload ``soak``) to a results CSV (``benchmarks/results.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import sys
import time
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict
from pathlib import Path

import httpx

from benchmarks import results
from benchmarks.soak_checks import (
    KV,
    LOCAL_BODY_CAP,
    MIB,
    RUNNING,
    SERVER_DEFAULT_BODY_CAP,
    WAITING,
    WARM_FRACTION,
    flat,
    parse_metrics,
)
from benchmarks.soak_mix import MIX, Case, MixContext, build_case, image_pool, warmup_case
from benchmarks.soak_report import Monitor, Report, history_rows, mib, summary
from benchmarks.soak_send import send
from benchmarks.soak_server import LocalServer


async def drain(client: httpx.AsyncClient, limit_s: float) -> tuple[float | None, dict[str, float]]:
    """Wait until the engine is idle with every KV block free; (seconds it took or None, the last
    /metrics values)."""
    start, last = time.monotonic(), {}
    while True:
        with suppress(httpx.HTTPError, ValueError):
            last = parse_metrics((await client.get("/metrics", timeout=10)).text)
            if all(k in last for k in (RUNNING, WAITING, KV)) and not any(
                    last[k] for k in (RUNNING, WAITING, KV)):
                return time.monotonic() - start, last
        if time.monotonic() - start > limit_s:
            return None, last
        await asyncio.sleep(0.2)


async def still_serving(client: httpx.AsyncClient, ctx: MixContext, timeout_s: float) -> bool:
    try:
        if (await client.get("/health", timeout=10)).status_code != 200:
            return False
    except httpx.HTTPError:
        return False
    body = json.dumps({"model": ctx.model, "max_tokens": 4,
                       "messages": [{"role": "user", "content": "Describe the image."}]}).encode()
    case = Case(-1, "final", "/v1/chat/completions", body)
    return (await send(client, case, timeout_s)).result == "ok"


@asynccontextmanager
async def http_client(url: str, api_key: str | None, concurrency: int, timeout_s: float):
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # Idle connections are dropped well before the server's keep-alive timeout (5 s): reusing one
    # just as the server closes it fails with no answer, a race of HTTP/1.1, not a server fault.
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency,
                          keepalive_expiry=1.0)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(timeout_s, connect=10)) as client:
        yield client


async def served_model(client: httpx.AsyncClient) -> tuple[str, int]:
    card = (await client.get("/v1/models", timeout=30)).json()["data"][0]
    return card["id"], int(card.get("max_model_len") or 8192)


async def warm_up(client: httpx.AsyncClient, ctx: MixContext, args: argparse.Namespace,
                  report: Report) -> None:
    """``--warmup`` requests of fresh five-tile images before the run: they fill the bounded
    image-embedding cache (256 MiB on the CPU, 1 GiB on a GPU: about 1,000 and 500 tiles), whose
    growth up to its bound would otherwise read as a leak. Their answers are checked too."""
    indices = iter(range(args.warmup))

    async def worker() -> None:
        for i in indices:
            o = await send(client, warmup_case(i, args.seed, ctx), args.timeout)
            label = o.error if o.result == "violation" else o.result
            report.warmup[label] = report.warmup.get(label, 0) + 1
            report.note_violation(o)

    await asyncio.gather(*(worker() for _ in range(args.concurrency)))


async def soak(args: argparse.Namespace, url: str, pid: int | None) -> Report:
    report = Report()
    async with http_client(url, args.api_key, args.concurrency, args.timeout) as client:
        model, session_len = await served_model(client)
        args.served_model = model
        ctx = MixContext(model, session_len, args.oversize_bytes, image_pool(args.seed))
        mix = {k: v for k, v in MIX.items() if k not in set(args.skip_kinds)}
        monitor = Monitor(pid, args.gpu_memory, args.sample_s)
        next_index, start = 0, time.monotonic()  # the clock starts again after the warm-up
        every = max(args.requests // 10, 100)  # progress lines on stderr

        def progress() -> float:
            by_time = (time.monotonic() - start) / args.seconds if args.seconds else 0.0
            return min(1.0, max(report.requests / args.requests, by_time))

        async def worker() -> None:
            nonlocal next_index
            while next_index < args.requests and (
                    not args.seconds or time.monotonic() - start < args.seconds):
                i, next_index = next_index, next_index + 1
                report.add(await send(client, build_case(i, args.seed, ctx, mix), args.timeout))
                if report.requests % every == 0:
                    print(f"soak: {report.requests} requests, {time.monotonic() - start:.0f} s, "
                          f"violations {sum(report.violations.values())}, RSS "
                          f"{mib(monitor.samples[-1].rss)}", file=sys.stderr, flush=True)

        monitor.sample(0.0)
        if args.warmup:
            await warm_up(client, ctx, args, report)
            report.warmup_s = time.monotonic() - start
        next_index, start = 0, time.monotonic()
        sampler = asyncio.ensure_future(monitor.run(client, progress))
        try:
            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
            report.wall_s = time.monotonic() - start
            report.drain_s, report.end_metrics = await drain(client, args.drain_s)
        finally:
            sampler.cancel()
            with suppress(asyncio.CancelledError):
                await sampler
        report.peak_kv = monitor.peak_kv
        report.healthy_after = await still_serving(client, ctx, args.timeout)
        monitor.sample(1.0)
    report.samples = monitor.samples
    first, last = monitor.samples[0], monitor.samples[-1]
    peak = max((s.rss for s in monitor.samples if s.rss is not None), default=None)
    report.memory = {"rss_start": first.rss, "rss_warm": monitor.at(WARM_FRACTION, "rss"),
                     "rss_end": last.rss, "rss_peak": peak, "gpu_start": first.gpu,
                     "gpu_warm": monitor.at(WARM_FRACTION, "gpu"), "gpu_end": last.gpu}
    return report


def judge(report: Report, args: argparse.Namespace) -> None:
    m, mem = report.end_metrics, report.memory
    report.invariants = {
        "well_formed": not report.violations,
        "no_kv_leak": report.drain_s is not None,
        "healthy_after": report.healthy_after,
        "rss_flat": flat(mem["rss_warm"], mem["rss_end"], args.rss_tolerance,
                         args.rss_slack_mib * MIB),
        "gpu_flat": flat(mem["gpu_warm"], mem["gpu_end"], 0.0, args.gpu_slack_mib * MIB),
    }
    if report.exit_code is not None or not args.url:
        report.invariants["clean_exit"] = report.exit_code in (0, -signal.SIGTERM)
    report.end_metrics = {k: m[k] for k in (RUNNING, WAITING, KV) if k in m}


def run(args: argparse.Namespace) -> Report:
    """The whole soak: own server (unless ``--url``), load, drain, checks, stop."""
    if args.url:
        report = asyncio.run(soak(args, args.url.rstrip("/"), args.pid))
        judge(report, args)
        return report
    server = LocalServer(["--max-body-bytes", str(LOCAL_BODY_CAP), "--log-level", "WARNING",
                          *([args.model] if args.model else []), *shlex.split(args.server_args)])
    server.start()
    try:
        report = asyncio.run(soak(args, server.url, server.proc.pid))
    finally:
        server.stop()
    report.exit_code, report.stop_s = server.exit_code, server.stop_s
    report.server_log_errors = server.log_errors()
    judge(report, args)
    if not report.passed:
        print(server.log_tail(), file=sys.stderr)
    return report




def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=10_000, help="requests to send (a cap)")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight at most")
    p.add_argument("--seconds", type=float, default=None, help="stop sending after this long")
    p.add_argument("--timeout", type=float, default=120.0, help="per-request deadline, seconds")
    p.add_argument("--seed", type=int, default=0, help="the mix's seed (request i is reproducible)")
    p.add_argument("--url", default=None, help="soak this running server instead of starting one")
    p.add_argument("--pid", type=int, default=None, help="with --url: the server's pid, for RSS")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default=None, help="own server: the checkpoint (default: embedded)")
    p.add_argument("--server-args", default="", help="own server: extra flags for api_server")
    p.add_argument("--oversize-bytes", type=int, default=None,
                   help="the server's body cap (default: 8 MiB for the own server, else 64 MiB)")
    p.add_argument("--skip-kinds", nargs="*", default=[], choices=sorted(MIX),
                   help="leave these kinds out of the mix")
    p.add_argument("--gpu-memory", action="store_true", help="sample GPU memory with nvidia-smi")
    p.add_argument("--warmup", type=int, default=220,
                   help="requests of fresh 5-tile images sent first, to fill the image cache")
    p.add_argument("--sample-s", type=float, default=0.5, help="memory sampling period")
    p.add_argument("--drain-s", type=float, default=30.0, help="time allowed to drain the load")
    p.add_argument("--rss-tolerance", type=float, default=0.10)
    p.add_argument("--rss-slack-mib", type=float, default=64.0)
    p.add_argument("--gpu-slack-mib", type=float, default=512.0)
    p.add_argument("--csv", type=Path, default=None, help="results CSV to append the run's rows to")
    p.add_argument("--json", type=Path, default=None, help="write the full report as JSON")
    p.add_argument("--system", default="vlmdeploy", help="the server's name in the results CSV")
    p.add_argument("--model-shape", default=None, help="the architecture's name in the CSV")
    p.add_argument("--device-line", default=None, help="device description (default: detected)")
    args = p.parse_args(argv)
    if args.oversize_bytes is None:
        args.oversize_bytes = SERVER_DEFAULT_BODY_CAP if args.url else LOCAL_BODY_CAP
    if args.requests < 1 or args.concurrency < 1:
        p.error("--requests and --concurrency must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    commit = results.current_commit()  # the code the server loads now, not what the tree is later
    report = run(args)
    print(summary(report, args))
    if args.csv:
        device = args.device_line or results.device_line()
        results.append(args.csv, history_rows(report, args, results.stamp(device, commit=commit)))
    if args.json:
        out = {"passed": report.passed, **asdict(report)}
        args.json.write_text(json.dumps(out, indent=1, default=str))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
