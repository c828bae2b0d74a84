"""When the GPU sits idle during a batch run: W2-style requests (distinct SIDE x SIDE JPEGs, text,
fixed output length) through ``pipe()``, with only the GPU's activity recorded (CUPTI; no
per-operator host instrumentation, which would make gaps of its own).

Reports the busy fraction of the run's GPU span, the idle time by gap length, and the longest gaps
with the kernels on either side, which tells which part of a step the GPU waits for.

    python -m tools.diagnostics.gpu_gaps --preset 8b --n 64 --out gaps.md
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.workloads import gen, model_source, workload
from vlmdeploy import PytorchEngineConfig, pipeline

DEVICE_KINDS = ("kernel", "gpu_memcpy", "gpu_memset")
BUCKETS_US = (10, 100, 1000, 10_000)


def device_events(trace_path: Path) -> list[tuple[float, float, str]]:
    """(start µs, end µs, name) of every kernel, copy and memset, by start."""
    events = json.loads(trace_path.read_text())["traceEvents"]
    out = [(e["ts"], e["ts"] + e.get("dur", 0), e["name"]) for e in events
           if e.get("cat") in DEVICE_KINDS and e.get("ph") == "X"]
    return sorted(out)


Gap = tuple[float, str, str, float]  # (length µs, kernel before, kernel after, offset µs)


def gaps_of(events: list[tuple[float, float, str]]) -> tuple[float, list[Gap]]:
    """Busy µs (union of the intervals) and every idle gap: (length µs, kernel before, kernel
    after, offset µs from the first event)."""
    busy, gaps = 0.0, []
    t0 = events[0][0]
    cur_start, cur_end, last = events[0][0], events[0][1], events[0][2]
    for start, end, name in events[1:]:
        if start > cur_end:
            busy += cur_end - cur_start
            gaps.append((start - cur_end, last, name, cur_end - t0))
            cur_start = start
        if end >= cur_end:
            cur_end, last = end, name
    busy += cur_end - cur_start
    return busy, gaps


def idle_per_bucket(gaps: list[Gap], bucket_us: float, n: int) -> list[float]:
    """Idle ms in each of ``n`` consecutive buckets of ``bucket_us`` from the first event, a gap
    split over the buckets it spans (its part past the last bucket is left out)."""
    out = [0.0] * n
    for length, _, _, at in gaps:
        end = at + length
        for i in range(int(at // bucket_us), min(n, int(end // bucket_us) + 1)):
            lo, hi = max(at, i * bucket_us), min(end, (i + 1) * bucket_us)
            out[i] += max(0.0, hi - lo) / 1e3
    return out


def short(name: str, width: int = 48) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def early(events, seconds: float, top: int = 15) -> str:
    """The run's first ``seconds``: idle ms in each tenth of a second, and GPU time by kernel (the
    part that tells whether a slow start is the GPU working longer or waiting)."""
    end = events[0][0] + seconds * 1e6
    first = [e for e in events if e[0] < end]
    _, gaps = gaps_of(first)
    per = idle_per_bucket(gaps, 1e5, int(seconds * 10 + 0.999))
    lines = [f"First {seconds:g} s: idle ms in each 0.1 s: " + ", ".join(f"{v:.0f}" for v in per),
             "", f"GPU time by kernel in the first {seconds:g} s:", "",
             "| kernel | calls | ms | mean µs |", "|---|---:|---:|---:|"]
    by: dict[str, list[float]] = {}
    for start, stop, name in first:
        by.setdefault(short(name, 60), []).append(stop - start)
    for name, ds in sorted(by.items(), key=lambda kv: -sum(kv[1]))[:top]:
        lines.append(f"| {name} | {len(ds)} | {sum(ds) / 1e3:.1f} | {sum(ds) / len(ds):.0f} |")
    return "\n".join(lines) + "\n"


def report(events, wall_s: float, label: str) -> str:
    busy, gaps = gaps_of(events)
    span = events[-1][1] - events[0][0]
    lines = [f"### {label}", "",
             f"wall {wall_s:.2f} s; GPU span {span / 1e6:.2f} s, busy {busy / 1e6:.2f} s "
             f"({100 * busy / span:.1f}%), idle {(span - busy) / 1e6:.3f} s in {len(gaps)} gaps",
             "", "| gap length | gaps | idle s |", "|---|---:|---:|"]
    edges = (0,) + BUCKETS_US + (float("inf"),)
    for lo, hi in zip(edges, edges[1:]):
        sel = [g[0] for g in gaps if lo <= g[0] < hi]
        lines.append(f"| {lo}–{hi} µs | {len(sel)} | {sum(sel) / 1e6:.3f} |")
    per_s = idle_per_bucket(gaps, 1e6, int(span // 1e6) + 1)  # idle ms in each second
    lines += ["", "Idle ms in each second of the run: " + ", ".join(f"{v:.0f}" for v in per_s)]
    lines += ["", "Longest gaps:", "", "| at s | gap ms | after | before |", "|---:|---:|---|---|"]
    for g, before, after, at in sorted(gaps, reverse=True)[:25]:
        lines.append(f"| {at / 1e6:.3f} | {g / 1e3:.2f} | {short(before)} | {short(after)} |")
    # which kernels most often follow a gap of 100 µs or more (what the GPU waited to be given)
    follow: dict[str, list[float]] = {}
    for g, _, after, _ in gaps:
        if g >= 100:
            follow.setdefault(short(after), []).append(g)
    lines += ["", "Kernels that start after gaps ≥ 100 µs:", "", "| kernel | gaps | idle ms |",
              "|---|---:|---:|"]
    for name, gs in sorted(follow.items(), key=lambda kv: -sum(kv[1]))[:12]:
        lines.append(f"| {name} | {len(gs)} | {sum(gs) / 1e3:.1f} |")
    # where the busy time goes
    per: dict[str, list[float]] = {}
    for start, end, name in events:
        per.setdefault(short(name, 60), []).append(end - start)
    lines += ["", "GPU time by kernel:", "", "| kernel | calls | s | share |",
              "|---|---:|---:|---:|"]
    total = sum(sum(v) for v in per.values())
    for name, ds in sorted(per.items(), key=lambda kv: -sum(kv[1]))[:25]:
        lines.append(f"| {name} | {len(ds)} | {sum(ds) / 1e6:.3f} | {100 * sum(ds) / total:.1f}% |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--preset", help="write config + tokenizer of this size, dummy weights")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--side", type=int, default=1024)
    ap.add_argument("--n-text", type=int, default=100)
    ap.add_argument("--n-out", type=int, default=100)
    ap.add_argument("--prep-workers", type=int, help="threads preparing requests (default: the "
                    "pipeline's own choice)")
    ap.add_argument("--switch-interval", type=float, help="sys.setswitchinterval, seconds (the "
                    "interpreter's default is 0.005)")
    ap.add_argument("--runs", type=int, default=1, help="measured runs in one process, each with "
                    "its own images (a ramp only in the first points at compilation, not the host)")
    ap.add_argument("--early", type=float, default=0.0, help="also detail the run's first this "
                    "many seconds (idle per 0.1 s, GPU time by kernel)")
    ap.add_argument("--out", help="also write the report here")
    args = ap.parse_args()
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    model, load_format = model_source(args.model, args.preset)
    cfg = PytorchEngineConfig(session_len=8192, load_format=load_format)
    acts = [ProfilerActivity.CUDA] if torch.cuda.is_available() else [ProfilerActivity.CPU]
    with pipeline(model, backend_config=cfg) as pipe:
        tok = pipe.tokenizer
        if args.prep_workers:
            from concurrent.futures import ThreadPoolExecutor

            pipe.preparer.pool.shutdown()
            pipe.preparer.pool = ThreadPoolExecutor(args.prep_workers,
                                                    thread_name_prefix="vlmdeploy-prep")
        pipe(workload(tok, 4, args.side, args.n_text, 7), gen_config=gen(args.n_out))  # warm-up
        texts = []
        for run in range(args.runs):
            prompts = workload(tok, args.n, args.side, args.n_text, 11 + run)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            with profile(activities=acts) as prof:
                t = time.perf_counter()
                pipe(prompts, gen_config=gen(args.n_out))
                wall = time.perf_counter() - t
            with tempfile.TemporaryDirectory() as d:
                path = Path(d) / "trace.json"
                prof.export_chrome_trace(str(path))
                events = device_events(path)
            threads = pipe.preparer.pool._max_workers
            label = (f"run {run + 1}: {args.n} requests, {args.side}² JPEG + {args.n_text} text "
                     f"tokens, {args.n_out} out; {threads} preparation threads, "
                     f"switch interval {sys.getswitchinterval() * 1e3:g} ms")
            text = report(events, wall, label) if events else f"### {label}\n\nno device events\n"
            if events and args.early:
                text += "\n" + early(events, args.early)
            texts.append(text)
            print(texts[-1], flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(texts))


if __name__ == "__main__":
    main()
