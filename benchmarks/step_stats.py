"""What a run's clocks and the engine's step records say: where a request's TTFT went, the spread
of the time between streamed tokens, where a batch run's wall time went, and the garbage
collector's pauses (every thread waits for them)."""

from __future__ import annotations

import gc
import statistics
import time

from vlmdeploy.engine.observer import StepRecord

FIRST_STEPS = 4  # steps of a batch run's ramp reported one by one


def token_gaps(gaps: list[float]) -> dict:
    """The spread of the time between streamed tokens (seconds): its median, and the time lost to
    slow steps, those over 1.5 times the median (a host stall the GPU waited for, or a collection),
    with their count."""
    if not gaps:
        return {}
    med = statistics.median(gaps)
    slow = [g - med for g in gaps if g > 1.5 * med]
    return {"tpot_median_ms": med * 1e3, "slow_steps": len(slow),
            "slow_steps_excess_ms": sum(slow) * 1e3, "slowest_step_ms": max(gaps) * 1e3}


def ttft_parts(trace: list[StepRecord], t0: float, ttft: float) -> dict:
    """Where one request's TTFT went (ms), from the engine's step records: until the engine's first
    step starts (preparation, hand-over), that step (vision encoder and prefill launched), the
    step after it, which launches the next token and then reads the first (the wait for the
    prefill's GPU work is in it), and the hand-over of the token to the caller."""
    if len(trace) < 2:
        return {"to_first_step": 0.0, "prefill_step": 0.0, "next_step": 0.0, "hand_over": 0.0}
    a, b = trace[0], trace[1]
    return {
        "to_first_step": (a.start - t0) * 1e3,
        "prefill_step": (a.end - a.start) * 1e3,
        "next_step": (b.end - a.end) * 1e3,
        "hand_over": (t0 + ttft - b.end) * 1e3,
    }


class GcPauses:
    """Time the garbage collector held the interpreter (every thread waits) while active: all
    collections, and the full ones (generation 2) apart."""

    def __init__(self):
        self.start, self.total, self.full, self.full_s = 0.0, 0.0, 0, 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self.start = time.perf_counter()
            return
        dt = time.perf_counter() - self.start
        self.total += dt
        if info.get("generation") == 2:
            self.full += 1
            self.full_s += dt

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self)

    def summary(self) -> dict:
        return {"gc_s": round(self.total, 3), "gc_full": self.full,
                "gc_full_s": round(self.full_s, 3)}


def timeline(trace: list[StepRecord], t0: float, t1: float) -> dict:
    """Where a batch run's wall time went, from the engine's step records: time inside steps
    (prefill-bearing or decode-only), time the engine thread spent outside them (waiting for
    prepared requests, or handing outputs over), and when the last prefill ran."""
    if not trace:
        return {}
    prefill = [r for r in trace if r.num_prefill_tokens]
    decode = [r for r in trace if not r.num_prefill_tokens]
    gaps = [b.start - a.end for a, b in zip(trace, trace[1:])]
    return {
        "steps": len(trace),
        "prefill_steps": len(prefill),
        "prefill_steps_s": round(sum(r.end - r.start for r in prefill), 3),
        # host time to schedule and queue them (the rest of a step waits for the step before)
        "prefill_launch_s": round(sum(r.launched - r.start for r in prefill), 3),
        "decode_steps": len(decode),
        "decode_steps_s": round(sum(r.end - r.start for r in decode), 3),
        "outside_steps_s": round((t1 - t0) - sum(r.end - r.start for r in trace), 3),
        "longest_gap_ms": round(max(gaps, default=0.0) * 1e3, 2),
        "first_step_after_s": round(trace[0].start - t0, 3),
        "last_prefill_at_s": round(prefill[-1].end - t0, 3) if prefill else None,
        "mean_decode_rows": round(sum(r.num_decode for r in trace) / len(trace), 1),
        # the ramp, while requests are still being prepared: [start ms, step ms, of which launch
        # ms, decode rows, prefill tokens, tiles, waiting] of the first steps
        "first_steps": [[round((r.start - t0) * 1e3, 1), round((r.end - r.start) * 1e3, 1),
                         round((r.launched - r.start) * 1e3, 1),
                         r.num_decode, r.num_prefill_tokens, r.num_tiles, r.num_waiting]
                        for r in trace[:FIRST_STEPS]],
        "prefill_tokens": sum(r.num_prefill_tokens for r in trace),
        "tiles": sum(r.num_tiles for r in trace),
    }
