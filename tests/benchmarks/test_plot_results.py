"""The history plot pairs vlmdeploy with LMDeploy only within one run (same date, time, device),
inverts latencies, and leaves quoted baselines out."""

from __future__ import annotations

import pytest

from benchmarks import plot_results, results

H100 = "NVIDIA H100 80GB HBM3, 81559 MiB; torch 2.11"


def rows() -> list[dict]:
    run = results.Stamp("2026-12-01", "10:00", "abc", H100)
    other = results.Stamp("2026-12-01", "11:00", "def", "one NVIDIA H200 GPU (about 139 GiB)")
    quoted = results.Stamp("2026-12-01", "", "", H100)
    r = lambda st, system, workload, metric, v: results.row(st, "s", workload, metric, system, v,
                                                            "u")
    return [
        r(run, "vlmdeploy", "W1", "ttft_ms", 20.0), r(run, "lmdeploy-0.18", "W1", "ttft_ms", 80.0),
        r(run, "vlmdeploy", "W2", "requests_per_s", 9.0),
        r(run, "lmdeploy-0.18", "W2", "requests_per_s", 7.5),
        r(run, "vlmdeploy", "W3", "output_tokens_per_s", 12000),  # no baseline in this run
        r(other, "vlmdeploy", "W1", "tpot_ms", 5.0),
        r(other, "lmdeploy-0.18", "W1", "tpot_ms", 6.0),
        r(quoted, "lmdeploy-0.18", "W3", "output_tokens_per_s", 9000),
    ]


def test_ratios_pair_runs_and_invert_latencies():
    points = plot_results.ratios(rows())
    assert [label for label, _ in points] == ["12-01 10:00 H100", "12-01 11:00 H200"]
    first, second = points[0][1], points[1][1]
    assert first == {"W1 TTFT": 4.0, "W2 requests/s": pytest.approx(1.2)}
    assert second == {"W1 TPOT": pytest.approx(1.2)}


def test_svg_has_a_point_per_pair_and_the_parity_line(tmp_path):
    csv, out = tmp_path / "r.csv", tmp_path / "r.svg"
    results.append(csv, rows())
    plot_results.main(["--csv", str(csv), "--out", str(out)])
    svg = out.read_text()
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    assert svg.count("<circle") == 3 and 'stroke-dasharray="4 3"' in svg
    assert "12-01 10:00 H100" in svg and "W3 output tokens/s" in svg  # legend lists every series
