"""Prometheus metrics at `/metrics`, under vLLM's names.

Names: we publish vLLM's series names (`vllm:num_requests_running`, `vllm:kv_cache_usage_perc`,
`vllm:time_to_first_token_seconds`, ...) with vLLM's labels (`model_name`, `engine`), and no
`vlmdeploy:` copies. The point of the endpoint is that the Grafana dashboards, alert rules and
benchmark scrapers people already run against vLLM work unchanged; those key on exact names. Every
query of vLLM's stock Grafana dashboard (`examples/online_serving/prometheus_grafana/grafana.json`,
both its V0 and V1 versions) returns series: `tests/serve/test_serve_metrics.py` runs them all.
Where vLLM renamed a series and the dashboards still draw the old name, both are published
(`vllm:gpu_cache_usage_perc` beside `vllm:kv_cache_usage_perc`,
`vllm:time_per_output_token_seconds` beside `vllm:inter_token_latency_seconds`); anyone who wants
another prefix can rename at scrape time (`metric_relabel_configs`).

Engine gauges (running/waiting requests, KV-cache usage as a 0..1 fraction like vLLM's, preemptions)
are read from `pipe.stats()` at scrape time (requests waiting for a server slot count as waiting);
request counters and histograms are recorded by the server as each engine request ends. Each app
has its own registry, so several apps can live in a process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

logger = logging.getLogger("vlmdeploy.serve")

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
                 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
# token counts: 1, 2, 5, 10, 20, 50, ... (vLLM's 1-2-5 series) up to 500k
LENGTH_BUCKETS = tuple(m * 10**e for e in range(6) for m in (1, 2, 5))
LABELS = ["model_name", "engine"]  # vLLM's label set (one engine: "0")
ENGINE = "0"


class _EngineCollector:
    """Scrape-time gauges from `stats()`."""

    def __init__(self, stats: Callable[[], dict[str, Any]], model_name: str):
        self._stats = stats
        self._model = model_name

    def describe(self) -> Iterator[Metric]:
        yield from self._families({})

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self._stats()
        except Exception:  # a dead engine must not break the scrape; /health reports it
            logger.debug("engine stats unavailable", exc_info=True)
            return
        yield from self._families(stats)

    def _families(self, stats: dict[str, Any]) -> Iterator[Metric]:
        values = [self._model, ENGINE]
        gauges = (
            ("vllm:num_requests_running", "Requests in prefill or decode.", "num_running"),
            ("vllm:num_requests_waiting", "Requests waiting: for a server slot "
             "(--max-concurrent-requests) or to be scheduled.", "num_waiting"),
            ("vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).",
             "kv_cache_usage"),
            ("vllm:gpu_cache_usage_perc", "The same as vllm:kv_cache_usage_perc (vLLM's older "
             "name, which its stock dashboard draws).", "kv_cache_usage"),
            # vlmdeploy never swaps KV blocks to the CPU (a preempted request is recomputed), so
            # these two are 0; they exist so that dashboards drawing them show that.
            ("vllm:num_requests_swapped", "Requests swapped to the CPU (always 0: vlmdeploy "
             "recomputes preempted requests).", "num_swapped"),
            ("vllm:cpu_cache_usage_perc", "CPU KV-cache usage (always 0: there is none).",
             "cpu_cache_usage"),
        )
        stats = {"num_swapped": 0, "cpu_cache_usage": 0.0, **stats} if stats else stats
        for name, doc, key in gauges:
            family = GaugeMetricFamily(name, doc, labels=LABELS)
            if key in stats:
                family.add_metric(values, float(stats[key]))
            yield family
        preempt = CounterMetricFamily("vllm:num_preemptions", "Requests preempted.", labels=LABELS)
        if "num_preemptions" in stats:
            preempt.add_metric(values, float(stats["num_preemptions"]))
        yield preempt


class ServerMetrics:
    """The server's request metrics. Per engine request (one choice): its tokens, finish reason,
    and times, all from `time.monotonic()`: arrival (the request's body read), start (handed to
    the engine), first token, end. vLLM's phases map onto them as: queue = arrival → start
    (admission wait excluded: it is before arrival; preparation included), prefill = start →
    first token (the engine's own queue included), decode = first token → end."""

    def __init__(self, model_name: str, stats: Callable[[], dict[str, Any]]):
        disable_created_metrics()  # vLLM publishes no `_created` series either
        self.registry = CollectorRegistry()
        self._model = model_name
        reg = self.registry

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, LABELS, buckets=buckets, registry=reg)

        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens processed.", LABELS,
                                     registry=reg)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", LABELS,
                                         registry=reg)
        self.success = Counter("vllm:request_success", "Finished requests, by finish reason.",
                               [*LABELS, "finished_reason"], registry=reg)
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time to first token.",
                              LATENCY_BUCKETS)
        self.tpot = histogram("vllm:time_per_output_token_seconds",
                              "Time per output token after the first.", TOKEN_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds",
                             "Time per output token after the first (vLLM's newer name).",
                             TOKEN_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency.",
                             LATENCY_BUCKETS)
        self.queue = histogram("vllm:request_queue_time_seconds",
                               "Arrival to start in the engine (preparation included).",
                               LATENCY_BUCKETS)
        self.prefill = histogram("vllm:request_prefill_time_seconds",
                                 "Start in the engine to first token.", LATENCY_BUCKETS)
        self.decode = histogram("vllm:request_decode_time_seconds",
                                "First token to last token.", LATENCY_BUCKETS)
        self.inference = histogram("vllm:request_inference_time_seconds",
                                   "Start in the engine to last token.", LATENCY_BUCKETS)
        self.prompt_len = histogram("vllm:request_prompt_tokens", "Prompt tokens per request.",
                                    LENGTH_BUCKETS)
        self.generation_len = histogram("vllm:request_generation_tokens",
                                        "Generated tokens per request.", LENGTH_BUCKETS)
        self.max_tokens = histogram("vllm:request_max_num_generation_tokens",
                                    "Most tokens a request may generate (its max_tokens, else "
                                    "what fits the context).", LENGTH_BUCKETS)
        self.params_max_tokens = histogram("vllm:request_params_max_tokens",
                                           "The max_tokens request parameter.", LENGTH_BUCKETS)
        self.registry.register(_EngineCollector(stats, model_name))

    def observe(self, arrival: float, first_token_at: float | None, prompt_tokens: int,
                generated: int, started: float | None = None, finish_reason: str | None = None,
                max_tokens: int | None = None, requested_max_tokens: int | None = None) -> None:
        """Record one finished (or abandoned) engine request; times are `time.monotonic()`."""
        now, labels = time.monotonic(), (self._model, ENGINE)
        started = arrival if started is None else started
        self.prompt_tokens.labels(*labels).inc(max(prompt_tokens, 0))
        self.generation_tokens.labels(*labels).inc(max(generated, 0))
        self.e2e.labels(*labels).observe(now - arrival)
        self.queue.labels(*labels).observe(max(started - arrival, 0.0))
        self.inference.labels(*labels).observe(now - started)
        self.prompt_len.labels(*labels).observe(max(prompt_tokens, 0))
        self.generation_len.labels(*labels).observe(max(generated, 0))
        if max_tokens is not None:
            self.max_tokens.labels(*labels).observe(max_tokens)
        if requested_max_tokens is not None:
            self.params_max_tokens.labels(*labels).observe(requested_max_tokens)
        self.success.labels(*labels, finish_reason or "abort").inc()
        if first_token_at is not None:
            self.ttft.labels(*labels).observe(first_token_at - arrival)
            self.prefill.labels(*labels).observe(max(first_token_at - started, 0.0))
            self.decode.labels(*labels).observe(now - first_token_at)
            if generated > 1:
                per_token = (now - first_token_at) / (generated - 1)
                self.tpot.labels(*labels).observe(per_token)
                self.itl.labels(*labels).observe(per_token)

    def render(self) -> bytes:
        return generate_latest(self.registry)
