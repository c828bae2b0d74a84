"""Timing on the GPU for the kernel benchmark and the tuning sweeps: medians of CUDA-graph replays
(no launch gaps, as in the engine's captured steps) over enough independent input sets to defeat
the L2 cache, the copy and matmul ceilings those times are judged against, and the device line.
"""

from __future__ import annotations

import datetime
import math
import statistics
import subprocess
from collections.abc import Callable

import torch
import triton

DTYPE = torch.bfloat16
DEV = torch.device("cuda")
ROTATE_BYTES = 256 << 20  # input sets per graph until their total is ~5x the 50 MB L2


def graph_ms(calls: list[Callable[[], object]], reps: int = 30) -> float:
    """Median time of one call, from replays of a graph that runs every call once in turn."""
    for c in calls:
        c()  # compile and allocate outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times) / len(calls)


def eager_ms(fn: Callable[[], object]) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def n_sets(bytes_per_call: float) -> int:
    return max(1, min(64, math.ceil(ROTATE_BYTES / max(bytes_per_call, 1))))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes/s of DRAM traffic (read + write counted) in a device-to-device copy of ``nbytes``: the
    faster of the copy engine path (copy_) and an SM streaming kernel (neg)."""
    src = torch.randn(nbytes // 2, device=DEV, dtype=DTYPE)
    dst = torch.empty_like(src)
    copy_ms = min(
        graph_ms([lambda: dst.copy_(src)], reps=20),
        graph_ms([lambda: torch.neg(src, out=dst)], reps=20),
    )
    return 2 * nbytes / (copy_ms * 1e-3)


def measure_ceilings() -> tuple[float, float]:
    """(copy bandwidth in bytes/s counting read + write, bf16 matmul FLOP/s), on random data."""
    bw = copy_bandwidth()
    a = torch.randn(8192, 8192, device=DEV, dtype=DTYPE)
    b = torch.randn(8192, 8192, device=DEV, dtype=DTYPE)
    rate = 2 * 8192**3 / (graph_ms([lambda: a @ b], reps=20) * 1e-3)
    return bw, rate


def device_line() -> str:
    """The engine's device line plus what kernel times also depend on: the multiprocessor count and
    the Triton and CUDA versions."""
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        gpu = smi.stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        gpu = torch.cuda.get_device_name()
    props = torch.cuda.get_device_properties(DEV)
    return (
        f"{gpu}; {props.multi_processor_count} SMs; torch {torch.__version__}, "
        f"triton {triton.__version__}, CUDA {torch.version.cuda}"
    )


def today() -> str:
    try:
        return subprocess.run(
            ["date", "+%Y-%m-%d"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return datetime.date.today().isoformat()
