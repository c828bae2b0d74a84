"""The results history: rows appended under one header, merges that skip known rows, the commit
stamp, and the history in docs/ itself (well-formed, and its plot up to date)."""

from __future__ import annotations

import datetime
import json
import re
import subprocess

import pytest

from benchmarks import plot_results, results

STAMP = results.Stamp("2026-12-01", "09:30:00", "abc1234", "NVIDIA H100 80GB HBM3; torch 2.11")


def test_rows_append_under_one_header(tmp_path):
    path = tmp_path / "sub" / "results.csv"
    a = results.row(STAMP, "InternVL3.5-8B", "W1", "tpot_ms", "vlmdeploy", 5.5634, "ms")
    b = results.row(STAMP, "InternVL3.5-8B", "W3", "output_tokens_per_s", "vlmdeploy", 12708.4,
                    "tok/s", note="runs 12789, 12708")
    assert results.append(path, [a]) == 1 and results.append(path, [b]) == 1
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(results.COLUMNS) and len(lines) == 3
    rows = results.read(path)
    assert [r["value"] for r in rows] == ["5.563", "12708"]  # four significant digits, whole above
    assert rows[1]["note"] == "runs 12789, 12708" and rows[0]["commit"] == "abc1234"


def test_merge_skips_rows_already_in_the_history(tmp_path):
    history, run = tmp_path / "history.csv", tmp_path / "run.csv"
    old = results.row(STAMP, "s", "W2", "requests_per_s", "vlmdeploy", 9.58, "req/s")
    new = results.row(STAMP, "s", "W2", "requests_per_s", "lmdeploy-0.18", 7.46, "req/s")
    results.append(history, [old])
    results.append(run, [old, new])
    assert results.merge(run, history) == 1
    assert results.merge(run, history) == 0
    assert [r["system"] for r in results.read(history)] == ["vlmdeploy", "lmdeploy-0.18"]


def test_stamp_takes_the_commit_from_the_environment(monkeypatch):
    monkeypatch.setenv("BENCH_COMMIT", "0123abc")
    now = datetime.datetime(2026, 12, 1, 23, 5, 9, tzinfo=datetime.timezone.utc)
    assert results.stamp("dev", now) == results.Stamp("2026-12-01", "23:05:09", "0123abc", "dev")


def test_commit_of_the_checkout(monkeypatch):
    monkeypatch.delenv("BENCH_COMMIT", raising=False)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=results.HISTORY.parents[1],
                          capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    assert results.current_commit().split("-")[0] == head.stdout.strip()


def test_history_is_well_formed():
    rows = results.read()
    assert rows and all(set(r) == set(results.COLUMNS) for r in rows)
    for r in rows:
        float(r["value"])
        datetime.date.fromisoformat(r["date"])
        assert not r["time_utc"] or re.fullmatch(r"\d\d:\d\d(:\d\d)?", r["time_utc"])
        assert r["device"] and r["workload"] and r["metric"] and r["system"] and r["unit"]
    keys = [(r["date"], r["time_utc"], r["device"], r["system"], r["workload"], r["metric"])
            for r in rows]
    assert len(keys) == len(set(keys))  # one row per (run, system, workload, metric)


def test_plot_is_drawn_from_the_history():
    """docs/results.svg is what benchmarks/plot_results.py draws from docs/results.csv."""
    svg = plot_results.svg(plot_results.ratios(results.read()))
    assert results.HISTORY.with_suffix(".svg").read_text() == svg


def test_an_ab_call_becomes_rows_stamped_per_run(tmp_path):
    from benchmarks.results import ab_rows

    for rnd, side, tpot in [(1, "base", 5.55), (1, "this", 5.57)]:
        run = {"date": "2026-12-07", "time_utc": f"13:3{rnd}:00", "device": "GPU X; torch 2",
               "w1": {"ttft_ms": 17.0, "tpot_ms": tpot}, "w2": {"requests_per_s": 9.6}}
        (tmp_path / f"ab-{rnd}-{side}.json").write_text(json.dumps(run))
    rows = ab_rows(tmp_path, {"base": "aaa", "this": "bbb"}, "A/B")
    assert [(r["commit"], r["workload"], r["metric"], r["value"]) for r in rows] == [
        ("aaa", "W1", "ttft_ms", "17"), ("aaa", "W1", "tpot_ms", "5.55"),
        ("aaa", "W2", "requests_per_s", "9.6"),
        ("bbb", "W1", "ttft_ms", "17"), ("bbb", "W1", "tpot_ms", "5.57"),
        ("bbb", "W2", "requests_per_s", "9.6"),
    ]
    assert {r["note"] for r in rows} == {"A/B: base, round 1", "A/B: this, round 1"}
