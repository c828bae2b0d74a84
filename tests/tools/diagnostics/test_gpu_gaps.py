"""gpu_gaps.py's arithmetic on a hand-made trace: busy time is the union of the intervals, gaps
are what lies between, and the early window reports idle time per tenth of a second and kernel
time by name."""

from __future__ import annotations

from tools.diagnostics import gpu_gaps

# (start µs, end µs, name): two overlapping kernels, a 50 ms gap, a copy, a 120 ms gap, a kernel
EVENTS = [
    (0.0, 10_000.0, "gemm"),
    (5_000.0, 20_000.0, "norm"),
    (70_000.0, 71_000.0, "Memcpy HtoD"),
    (191_000.0, 200_000.0, "gemm"),
]


def test_busy_time_and_gaps():
    busy, gaps = gpu_gaps.gaps_of(EVENTS)
    assert busy == 20_000 + 1_000 + 9_000
    assert gaps == [(50_000.0, "norm", "Memcpy HtoD", 20_000.0),
                    (120_000.0, "Memcpy HtoD", "gemm", 71_000.0)]


def test_idle_time_is_split_over_the_buckets_a_gap_spans():
    _, gaps = gpu_gaps.gaps_of(EVENTS)
    assert gpu_gaps.idle_per_bucket(gaps, 100_000.0, 3) == [79.0, 91.0, 0.0]
    assert gpu_gaps.idle_per_bucket(gaps, 100_000.0, 1) == [79.0]  # past the last: left out


def test_early_window_splits_idle_time_and_kernel_time():
    text = gpu_gaps.early(EVENTS, 0.3)
    # the 50 ms gap lies in the first tenth; the 120 ms one (71–191 ms) spans the first two
    assert "idle ms in each 0.1 s: 79, 91, 0" in text
    rows = {r.split("|")[1].strip(): r.split("|")[2:5] for r in text.splitlines()
            if r.startswith("| ") and not r.startswith("| kernel")}
    assert [c.strip() for c in rows["gemm"]] == ["2", "19.0", "9500"]
    assert rows["norm"][0].strip() == "1" and rows["Memcpy HtoD"][1].strip() == "1.0"
