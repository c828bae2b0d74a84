"""The soak (benchmarks/soak.py) at CI size: 300 mixed requests against `vlmdeploy serve
api_server` on the embedded model (a subprocess on 127.0.0.1), then the invariants the full run
checks: every answer well-formed, no KV block leaked once the load drains, memory flat after
warm-up, the server healthy after and stopped cleanly. The checkers themselves are tested on
crafted answers, so a soak that passes is known to be able to fail."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest

from benchmarks import results, soak
from benchmarks.soak_checks import (
    MIB,
    VIOLATIONS,
    StreamCheck,
    check_answer,
    flat,
    parse_metrics,
)
from benchmarks.soak_mix import CHAT, COMPLETIONS, MIX, Case, MixContext, build_case, image_pool


@pytest.fixture(scope="module")
def run():
    # no warm-up: 300 requests bring too few new images to move the image cache's size
    args = soak.parse_args(["--requests", "300", "--concurrency", "8", "--timeout", "60",
                            "--warmup", "0", "--sample-s", "0.25"])
    return soak.run(args), args


def violations_by_kind(report: soak.Report) -> dict[str, dict[str, int]]:
    return {kind: {k: v for k, v in counts.items() if k in VIOLATIONS}
            for kind, counts in report.by_kind.items()
            if any(k in VIOLATIONS for k in counts)}


@pytest.mark.slow
def test_every_answer_is_well_formed(run):
    report, _ = run
    assert report.requests == 300
    assert violations_by_kind(report) == {}, report.examples


@pytest.mark.slow
def test_the_mix_exercised_every_kind_and_ending(run):
    report, _ = run
    assert set(report.by_kind) == set(MIX)
    for ending in ("ok", "rejected", "disconnected", "aborted"):
        assert report.outcomes.get(ending, 0) > 0, report.outcomes
    assert report.by_kind["disconnect"].get("disconnected", 0) > 0
    assert report.by_kind["abort"].get("aborted", 0) > 0


@pytest.mark.slow
def test_refusals_carry_the_right_status_and_code(run):
    report, _ = run
    codes = {label.split(" ", 1)[1] for label in report.codes if label.startswith("oversize ")}
    assert codes == {"413 request_too_large"}
    codes = {label.split(" ", 1)[1] for label in report.codes if label.startswith("too_long ")}
    assert codes == {"400 context_length_exceeded"}
    images = {label.split(" ")[2] for label in report.codes if label.startswith("bad_image ")}
    assert images <= {"invalid_image_format", "unsupported_image_type", "image_too_large",
                      "invalid_image_url", "too_many_images"}, images


@pytest.mark.slow
def test_no_kv_block_leaks_once_the_load_drains(run):
    report, _ = run
    assert report.peak_kv > 0  # the load did hold KV blocks
    assert report.drain_s is not None and report.invariants["no_kv_leak"]
    assert report.end_metrics == {soak.RUNNING: 0, soak.WAITING: 0, soak.KV: 0}


@pytest.mark.slow
def test_server_memory_is_flat_after_warm_up(run):
    report, _ = run
    mem = report.memory
    assert mem["rss_warm"] and mem["rss_end"], mem
    assert report.invariants["rss_flat"], {k: v and v / MIB for k, v in mem.items()}
    assert report.invariants["gpu_flat"] is None  # not asked for


@pytest.mark.slow
def test_server_is_healthy_after_and_stops_cleanly(run):
    report, _ = run
    assert report.healthy_after
    assert report.exit_code in (0, -signal.SIGTERM) and report.stop_s < 30
    assert report.server_log_errors == 0


@pytest.mark.slow
def test_history_rows_of_the_run(run, tmp_path):
    report, args = run
    st = results.Stamp("2026-12-07", "12:00:00", "abc1234", "CPU; torch x")
    rows = soak.history_rows(report, args, st)
    path = tmp_path / "results.csv"
    results.append(path, rows)
    by_metric = {r["metric"]: r for r in results.read(path)}
    assert by_metric["requests"]["value"] == "300"
    assert {f"errors_{k}" for k in VIOLATIONS} <= set(by_metric)
    assert {"rss_warm_mib", "rss_end_mib", "kv_cache_usage_end", "exit_code"} <= set(by_metric)
    assert all(r["workload"] == "soak" and r["model_shape"] == "internvl3_5-shapes-tiny"
               for r in by_metric.values())
    assert "cores" in by_metric["wall_s"]["note"]


# ---- the checkers, on crafted answers ------------------------------------------------------------

STREAM = Case(0, "chat_text", CHAT, b"{}", stream=True, choices=1)


def _chunk(finish: str | None = None, content: str = "a") -> str:
    return "data: " + json.dumps({"id": "x", "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {"content": content}, "finish_reason": finish}]})


def _stream(lines: list[str], case: Case = STREAM) -> tuple[str, str] | None:
    check = StreamCheck(case)
    for line in lines:
        check.feed(line)
    return check.finish()


def test_stream_check_accepts_a_complete_stream():
    assert _stream([_chunk(), _chunk("stop", ""), "data: [DONE]"]) is None


@pytest.mark.parametrize("lines,error", [
    ([_chunk(), _chunk("stop", "")], "malformed"),  # no [DONE]
    ([_chunk(), "data: [DONE]"], "malformed"),  # a choice never finished
    ([_chunk(), 'data: {"error": {"type": "server_error"}}', "data: [DONE]"], "stream_error"),
    ([_chunk(), "data: {not json", "data: [DONE]"], "malformed"),
    ([_chunk("stop", ""), _chunk(), "data: [DONE]"], "malformed"),  # text after the finish
    ([_chunk("stop", ""), "data: [DONE]", _chunk()], "malformed"),  # data after [DONE]
    ([_chunk("eos", ""), "data: [DONE]"], "malformed"),
])
def test_stream_check_finds_each_defect(lines, error):
    found = _stream(lines)
    assert found is not None and found[0] == error, found


def test_stream_check_wants_the_usage_chunk_when_asked():
    case = Case(0, "chat_text", CHAT, b"{}", stream=True, usage_chunk=True)
    usage = 'data: {"id":"x","object":"chat.completion.chunk","choices":[],"usage":' \
            '{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}'
    assert _stream([_chunk("stop"), "data: [DONE]"], case) == ("malformed", "no usage chunk")
    assert _stream([_chunk("stop"), usage, "data: [DONE]"], case) is None


ENVELOPE = json.dumps({"error": {"message": "no", "type": "invalid_request_error",
                                 "param": None, "code": "invalid_json"}}).encode()
GOOD_CHAT = json.dumps({"id": "c", "object": "chat.completion", "created": 1, "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}}).encode()


@pytest.mark.parametrize("case,status,body,headers,result", [
    (Case(0, "chat_text", CHAT), 200, GOOD_CHAT, {}, "ok"),
    (Case(0, "bad_json", CHAT, expect=frozenset({400})), 400, ENVELOPE, {}, "rejected"),
    (Case(0, "bad_json", CHAT, expect=frozenset({400})), 200, GOOD_CHAT, {}, "unexpected_status"),
    (Case(0, "chat_text", CHAT), 400, ENVELOPE, {}, "unexpected_status"),
    (Case(0, "chat_text", CHAT), 500, ENVELOPE, {}, "server_error"),
    (Case(0, "chat_text", CHAT), 502, b"Bad Gateway", {}, "server_error"),
    (Case(0, "bad_json", CHAT, expect=frozenset({400})), 400, b'{"detail": []}', {}, "malformed"),
    (Case(0, "bad_json", CHAT, expect=frozenset({400})), 422, ENVELOPE, {}, "unexpected_status"),
    (Case(0, "chat_text", CHAT, expect=frozenset({200, 503})), 503, json.dumps({"error": {
        "message": "down", "type": "service_unavailable_error", "param": None,
        "code": None}}).encode(), {}, "malformed"),  # no Retry-After
    (Case(0, "completion", COMPLETIONS), 200, GOOD_CHAT, {}, "malformed"),  # wrong object
    (Case(0, "chat_text", CHAT, choices=2), 200, GOOD_CHAT, {}, "malformed"),  # one choice of two
])
def test_check_answer_classifies(case, status, body, headers, result):
    outcome = check_answer(case, status, body, headers)
    assert (outcome.error if outcome.result == "violation" else outcome.result) == result, outcome


def test_metrics_parser_and_flatness_rule():
    text = ('# HELP vllm:kv_cache_usage_perc x\nvllm:kv_cache_usage_perc{model_name="m"} 0.25\n'
            'vllm:num_requests_running{model_name="m"} 3.0\n')
    assert parse_metrics(text) == {"vllm:kv_cache_usage_perc": 0.25,
                                   "vllm:num_requests_running": 3.0}
    assert flat(1000, 1100 + 64, 0.10, 64) and not flat(1000, 1100 + 65, 0.10, 64)
    assert flat(None, 5, 0.1, 0) is None


def test_requests_are_reproducible_and_follow_the_weights():
    ctx = MixContext("m", 8192, 8 << 20, image_pool(0))
    assert build_case(17, 3, ctx) == build_case(17, 3, ctx)
    kinds = [build_case(i, 0, ctx).kind for i in range(2000)]
    share = {k: kinds.count(k) / len(kinds) for k in MIX}
    weights = np.array(list(MIX.values()), dtype=float)
    for (kind, weight), expected in zip(MIX.items(), weights / weights.sum(), strict=True):
        assert abs(share[kind] - expected) < 0.02, (kind, weight, share[kind])
