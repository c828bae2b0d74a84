"""`/metrics` as vLLM's: every query of vLLM's stock Grafana dashboard
(`examples/online_serving/prometheus_grafana/grafana.json`, its V1 version and its older V0 one,
which also draws swapped requests and CPU cache) selects series from our output, with vLLM's
labels; `/metrics` is open beside API keys unless `--protect-metrics`, and `--disable-metrics`
removes it."""

from __future__ import annotations

import re

import pytest
from fake_pipeline import FakePipeline
from prometheus_client.parser import text_string_to_metric_families
from serve_helpers import chat, make_client

URL = "/v1/chat/completions"

# The `expr` of every panel target of the dashboard (V1; then the two V0-only ones).
DASHBOARD_QUERIES = [
    'histogram_quantile(0.99, sum by(le) (rate(vllm:e2e_request_latency_seconds_bucket{model_name="$model_name"}[$__rate_interval])))',  # noqa: E501
    'rate(vllm:e2e_request_latency_seconds_sum{model_name="$model_name"}[$__rate_interval])\n/\nrate(vllm:e2e_request_latency_seconds_count{model_name="$model_name"}[$__rate_interval])',  # noqa: E501
    'rate(vllm:prompt_tokens_total{model_name="$model_name"}[$__rate_interval])',
    'rate(vllm:generation_tokens_total{model_name="$model_name"}[$__rate_interval])',
    'histogram_quantile(0.99, sum by(le) (rate(vllm:time_per_output_token_seconds_bucket{model_name="$model_name"}[$__rate_interval])))',  # noqa: E501
    'rate(vllm:time_per_output_token_seconds_sum{model_name="$model_name"}[$__rate_interval])\n/\nrate(vllm:time_per_output_token_seconds_count{model_name="$model_name"}[$__rate_interval])',  # noqa: E501
    'vllm:num_requests_running{model_name="$model_name"}',
    'vllm:num_requests_waiting{model_name="$model_name"}',
    'histogram_quantile(0.99, sum by(le) (rate(vllm:time_to_first_token_seconds_bucket{model_name="$model_name"}[$__rate_interval])))',  # noqa: E501
    'rate(vllm:time_to_first_token_seconds_sum{model_name="$model_name"}[$__rate_interval])\n/\nrate(vllm:time_to_first_token_seconds_count{model_name="$model_name"}[$__rate_interval])',  # noqa: E501
    'vllm:gpu_cache_usage_perc{model_name="$model_name"}',
    'sum by(le) (increase(vllm:request_prompt_tokens_bucket{model_name="$model_name"}[$__rate_interval]))',  # noqa: E501
    'sum by(le) (increase(vllm:request_generation_tokens_bucket{model_name="$model_name"}[$__rate_interval]))',  # noqa: E501
    'sum by(finished_reason) (increase(vllm:request_success_total{model_name="$model_name"}[$__rate_interval]))',  # noqa: E501
    'rate(vllm:request_queue_time_seconds_sum{model_name="$model_name"}[$__rate_interval])',
    'rate(vllm:request_prefill_time_seconds_sum{model_name="$model_name"}[$__rate_interval])',
    'rate(vllm:request_decode_time_seconds_sum{model_name="$model_name"}[$__rate_interval])',
    'rate(vllm:request_max_num_generation_tokens_sum{model_name="$model_name"}[$__rate_interval])',
    # V0 only
    'vllm:num_requests_swapped{model_name="$model_name"}',
    'vllm:cpu_cache_usage_perc{model_name="$model_name"}',
]
# the dashboard's model variable: label_values({__name__=~"vllm:.*"}, model_name)
SELECTOR = re.compile(r'(vllm:[a-z_:]+)\{model_name="\$model_name"\}')


def samples(text: str) -> list:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


@pytest.fixture
def scraped():
    fake = FakePipeline()
    client = make_client(fake)
    client.post(URL, json=chat("a b c", max_tokens=3, ignore_eos=True))  # finish: length
    client.post(URL, json=chat("d", stream=True))  # finish: stop
    return samples(client.get("/metrics").text)


def test_every_dashboard_query_selects_series(scraped):
    model = "fake-model"
    names = {s.name for s in scraped if s.labels.get("model_name") == model}
    assert model in {s.labels.get("model_name") for s in scraped if s.name.startswith("vllm:")}
    wanted = {m for query in DASHBOARD_QUERIES for m in SELECTOR.findall(query)}
    assert len(wanted) == 20
    assert not wanted - names, sorted(wanted - names)
    for sample in scraped:  # vLLM's label set everywhere
        if sample.name.startswith("vllm:"):
            assert sample.labels["model_name"] == model and sample.labels["engine"] == "0"


def test_the_series_hold_what_happened(scraped):
    def value(name, **labels):
        (v,) = [s.value for s in scraped if s.name == name
                and all(s.labels.get(k) == x for k, x in labels.items())]
        return v

    assert value("vllm:request_success_total", finished_reason="length") == 1
    assert value("vllm:request_success_total", finished_reason="stop") == 1
    assert value("vllm:request_prompt_tokens_count") == 2
    assert value("vllm:request_prompt_tokens_sum") == 3 + 1
    assert value("vllm:request_generation_tokens_sum") == 3 + 4
    assert value("vllm:request_generation_tokens_bucket", le="2.0") == 0
    assert value("vllm:request_generation_tokens_bucket", le="5.0") == 2
    assert value("vllm:request_max_num_generation_tokens_sum") == 3 + 4096 - 1  # max_tokens, fit
    assert value("vllm:request_params_max_tokens_count") == 1  # only the first gave max_tokens
    for name in ("queue_time", "prefill_time", "decode_time", "inference_time"):
        assert value(f"vllm:request_{name}_seconds_count") == 2
    assert value("vllm:inter_token_latency_seconds_count") == 2
    assert value("vllm:gpu_cache_usage_perc") == value("vllm:kv_cache_usage_perc")
    assert value("vllm:num_requests_swapped") == 0 and value("vllm:cpu_cache_usage_perc") == 0


def test_metrics_are_open_beside_api_keys_unless_protected():
    open_client = make_client(FakePipeline(), api_keys=("k",))
    assert open_client.get("/metrics").status_code == 200
    assert open_client.post(URL, json=chat()).status_code == 401
    closed = make_client(FakePipeline(), api_keys=("k",), protect_metrics=True)
    assert closed.get("/metrics").status_code == 401
    ok = closed.get("/metrics", headers={"Authorization": "Bearer k"})
    assert ok.status_code == 200 and "vllm:num_requests_running" in ok.text
    assert closed.get("/health").status_code == 200


def test_disable_metrics_and_docs():
    client = make_client(FakePipeline(), disable_metrics=True, disable_fastapi_docs=True)
    assert client.get("/metrics").status_code == 404
    assert client.get("/docs").status_code == 404 and client.get("/openapi.json").status_code == 404
    assert client.post(URL, json=chat()).status_code == 200


def test_protect_metrics_needs_keys():
    from vlmdeploy.serve import ServerConfig

    with pytest.raises(ValueError, match="--api-keys"):
        ServerConfig(protect_metrics=True)
