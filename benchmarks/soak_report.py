"""What a soak run saw: samples of memory over the run, the report and its invariants' inputs, the
summary table and the rows it adds to the results history."""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from benchmarks import results
from benchmarks.soak_checks import (
    KV,
    MIB,
    RUNNING,
    VIOLATIONS,
    Outcome,
    cpu_name,
    gpu_memory_bytes,
    parse_metrics,
    rss_bytes,
)


@dataclass
class Sample:
    t: float
    progress: float
    rss: int | None
    gpu: int | None
    load: float  # the machine's 1-minute load average: other work slows the run down


@dataclass
class Report:
    requests: int = 0
    wall_s: float = 0.0
    warmup: dict[str, int] = field(default_factory=dict)  # endings of the warm-up requests
    warmup_s: float = 0.0
    outcomes: dict[str, int] = field(default_factory=dict)  # ok/rejected/disconnected/...
    violations: dict[str, int] = field(default_factory=dict)  # by class
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)  # kind -> result/class
    statuses: dict[str, int] = field(default_factory=dict)
    codes: dict[str, int] = field(default_factory=dict)  # "kind status code" of refusals
    examples: list[dict[str, Any]] = field(default_factory=list)
    drain_s: float | None = None
    end_metrics: dict[str, float] = field(default_factory=dict)
    peak_kv: float = 0.0
    healthy_after: bool = False
    memory: dict[str, float | None] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    exit_code: int | None = None
    stop_s: float | None = None
    server_log_errors: int | None = None
    invariants: dict[str, bool | None] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(v is not False for v in self.invariants.values())

    def add(self, o: Outcome) -> None:
        self.requests += 1
        label = o.error if o.result == "violation" else o.result
        self.outcomes[o.result] = self.outcomes.get(o.result, 0) + 1
        kind = self.by_kind.setdefault(o.kind, {})
        kind[label] = kind.get(label, 0) + 1
        key = str(o.status) if o.status is not None else o.result
        self.statuses[key] = self.statuses.get(key, 0) + 1
        if o.result == "rejected":
            label = f"{o.kind} {o.status} {o.code}"
            self.codes[label] = self.codes.get(label, 0) + 1
        self.note_violation(o)

    def note_violation(self, o: Outcome) -> None:
        if o.result == "violation":
            self.violations[o.error] = self.violations.get(o.error, 0) + 1
            if len(self.examples) < 20:
                self.examples.append(asdict(o))


class Monitor:
    """Samples the server's memory (and KV usage) while the run goes on."""

    def __init__(self, pid: int | None, gpu: bool, period_s: float):
        self.pid, self.gpu, self.period_s = pid, gpu, period_s
        self.samples: list[Sample] = []
        self.peak_kv = 0.0

    def sample(self, progress: float) -> Sample:
        s = Sample(time.monotonic(), progress, rss_bytes(self.pid) if self.pid else None,
                   gpu_memory_bytes() if self.gpu else None, os.getloadavg()[0])
        self.samples.append(s)
        return s

    async def run(self, client: httpx.AsyncClient, progress: Any) -> None:
        while True:
            await asyncio.to_thread(self.sample, progress())
            with suppress(httpx.HTTPError, ValueError):
                m = parse_metrics((await client.get("/metrics", timeout=10)).text)
                self.peak_kv = max(self.peak_kv, m.get(KV, 0.0))
            await asyncio.sleep(self.period_s)

    def at(self, fraction: float, attr: str) -> int | None:
        """The first sample of ``attr`` taken at or after ``fraction`` of the run."""
        return next((getattr(s, attr) for s in self.samples
                     if s.progress >= fraction and getattr(s, attr) is not None), None)


def mib(value: float | None) -> str:
    return "-" if value is None else f"{value / MIB:.0f} MiB"


def summary(report: Report, args: argparse.Namespace) -> str:
    mem = report.memory
    lines = [
        f"soak: {report.requests} requests in {report.wall_s:.1f} s "
        f"({report.requests / max(report.wall_s, 1e-9):.1f}/s) at concurrency {args.concurrency}",
        f"warm-up: {sum(report.warmup.values())} image requests in {report.warmup_s:.1f} s ("
        + ", ".join(f"{k} {v}" for k, v in sorted(report.warmup.items())) + ")",
        "results: " + ", ".join(f"{k} {v}" for k, v in sorted(report.outcomes.items())),
        "violations: " + (", ".join(f"{k} {v}" for k, v in sorted(report.violations.items()))
                          or "none"),
        "statuses: " + ", ".join(f"{k} {v}" for k, v in sorted(report.statuses.items())),
        f"after the drain ({report.drain_s if report.drain_s is None else round(report.drain_s, 2)}"
        f" s): " + ", ".join(f"{k} {v:g}" for k, v in report.end_metrics.items())
        + f"; peak KV usage {report.peak_kv:.3f}",
        f"server RSS: start {mib(mem['rss_start'])}, at 20% {mib(mem['rss_warm'])}, end "
        f"{mib(mem['rss_end'])}, peak {mib(mem['rss_peak'])}",
    ]
    if mem.get("gpu_end") is not None:
        lines.append(f"GPU memory: at 20% {mib(mem['gpu_warm'])}, end {mib(mem['gpu_end'])}")
    if report.exit_code is not None or report.stop_s is not None:
        lines.append(f"stop: exit code {report.exit_code} after {report.stop_s} s; server log "
                     f"errors {report.server_log_errors}")
    lines.append("invariants: " + ", ".join(
        f"{k} {'n/a' if v is None else ('ok' if v else 'FAILED')}"
        for k, v in report.invariants.items()))
    for example in report.examples[:5]:
        lines.append(f"  e.g. request {example['index']} ({example['kind']}): {example['error']}"
                     f" {example['status']} {example['detail'][:160]}")
    return "\n".join(lines)


def history_rows(report: Report, args: argparse.Namespace, st: results.Stamp) -> list[dict]:
    """The run's rows for the results history (workload ``soak``)."""
    shape = args.model_shape or getattr(args, "served_model", "") or ""
    mem = report.memory
    load = max((s.load for s in report.samples), default=0.0)
    note = (f"{report.requests} mixed requests at concurrency {args.concurrency}, seed "
            f"{args.seed}, after {args.warmup} warm-up requests; "
            f"{'a running server (--url)' if args.url else 'own server'}; machine: {cpu_name()}, "
            f"1-min load average up to {load:.1f}; invariants "
            f"{'held' if report.passed else 'FAILED'}")
    values: list[tuple[str, float | None, str]] = [
        ("requests", report.requests, "requests"), ("wall_s", report.wall_s, "s"),
        ("requests_per_s", report.requests / max(report.wall_s, 1e-9), "req/s"),
        *[(f"{k}_requests", report.outcomes.get(k, 0), "requests")
          for k in ("ok", "rejected", "disconnected", "aborted")],
        ("errors", sum(report.violations.values()), "requests"),
        *[(f"errors_{k}", report.violations.get(k, 0), "requests") for k in VIOLATIONS],
        ("kv_cache_usage_end", report.end_metrics.get(KV), "fraction"),
        ("num_requests_running_end", report.end_metrics.get(RUNNING), "requests"),
        *[(f"{k}_mib", None if mem.get(k) is None else mem[k] / MIB, "MiB")
          for k in ("rss_start", "rss_warm", "rss_end", "rss_peak", "gpu_warm", "gpu_end")],
        ("exit_code", report.exit_code, "code"),
    ]
    return [results.row(st, shape, "soak", metric, args.system, value, unit, note)
            for metric, value, unit in values if value is not None]
