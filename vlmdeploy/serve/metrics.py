"""Prometheus metrics at `/metrics`, under vLLM's names.

Names: we publish vLLM's series names (`vllm:num_requests_running`, `vllm:kv_cache_usage_perc`,
`vllm:time_to_first_token_seconds`, ...) with a `model_name` label, and no `vlmdeploy:` copies. The
point of the endpoint is that the Grafana dashboards, alert rules and benchmark scrapers people
already run against vLLM work unchanged; those key on exact names. Publishing a second, aliased set
would double every series for no reader, and anyone who wants another prefix can rename at scrape
time (`metric_relabel_configs`).

Engine gauges (running/waiting requests, KV-cache usage as a 0..1 fraction like vLLM's, preemptions)
are read from `pipe.stats()` at scrape time; request counters and latency histograms are recorded by
the server as each engine request ends. Each app has its own registry, so several apps can live in a
process.
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


class _EngineCollector:
    """Scrape-time gauges from `pipe.stats()`."""

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
        labels = ["model_name"]
        gauges = (("vllm:num_requests_running", "Requests in prefill or decode.", "num_running"),
                  ("vllm:num_requests_waiting", "Requests waiting to be scheduled.", "num_waiting"),
                  ("vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).",
                   "kv_cache_usage"))
        for name, doc, key in gauges:
            family = GaugeMetricFamily(name, doc, labels=labels)
            if key in stats:
                family.add_metric([self._model], float(stats[key]))
            yield family
        preempt = CounterMetricFamily("vllm:num_preemptions", "Requests preempted.", labels=labels)
        if "num_preemptions" in stats:
            preempt.add_metric([self._model], float(stats["num_preemptions"]))
        yield preempt


class ServerMetrics:
    def __init__(self, model_name: str, stats: Callable[[], dict[str, Any]]):
        disable_created_metrics()  # vLLM publishes no `_created` series either
        self.registry = CollectorRegistry()
        self._model = model_name
        reg, labels = self.registry, ["model_name"]
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens processed.", labels,
                                     registry=reg)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", labels,
                                         registry=reg)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=LATENCY_BUCKETS, registry=reg)
        self.tpot = Histogram("vllm:time_per_output_token_seconds",
                              "Time per output token after the first.", labels,
                              buckets=TOKEN_BUCKETS, registry=reg)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency.",
                             labels, buckets=LATENCY_BUCKETS, registry=reg)
        self.registry.register(_EngineCollector(stats, model_name))

    def observe(self, arrival: float, first_token_at: float | None, prompt_tokens: int,
                generated: int) -> None:
        """Record one finished (or abandoned) engine request; times are `time.monotonic()`."""
        now, model = time.monotonic(), self._model
        self.prompt_tokens.labels(model).inc(max(prompt_tokens, 0))
        self.generation_tokens.labels(model).inc(max(generated, 0))
        self.e2e.labels(model).observe(now - arrival)
        if first_token_at is not None:
            self.ttft.labels(model).observe(first_token_at - arrival)
            if generated > 1:
                self.tpot.labels(model).observe((now - first_token_at) / (generated - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
