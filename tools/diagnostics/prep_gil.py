"""How long preparing a request takes, and how much of that the preparing thread holds the GIL.

The engine thread launches GPU work while the preparation threads decode and tile images; every
launch gives the GIL up and must take it back, so the GIL time of the preparation is time the
engine thread can lose. W2- or W3-style requests (a SIDE x SIDE JPEG as a base64 data URL and
N_TEXT text tokens) go through ``Pipeline.prepare_sync`` on THREADS threads while a probe thread
gives the GIL up and takes it back in a loop, as a launch does; the probe's waits beyond its own
pace, per request, estimate the GIL time. Runs on the CPU (the preparation does not use the GPU).

    python -m tools.diagnostics.prep_gil --side 1024 --n-text 100 --n 64      # W2's requests
    python -m tools.diagnostics.prep_gil --side 448 --n-text 30 --n 256       # W3's requests
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from benchmarks.workloads import workload
from vlmdeploy import PytorchEngineConfig, pipeline
from vlmdeploy.testing.checkpoint import make_checkpoint


class Probe:
    """A thread that releases and retakes the GIL in a loop, recording each round's length."""

    def __init__(self):
        self.rounds: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last = time.perf_counter()
        while not self._stop.is_set():
            time.sleep(0)  # releases the GIL, then waits for it
            now = time.perf_counter()
            self.rounds.append(now - last)
            last = now

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def pace(seconds: float = 0.3) -> float:
    """The probe's median round with nothing else running."""
    with Probe() as probe:
        time.sleep(seconds)
    return statistics.median(probe.rounds)


def measure(pipe, prompts: list, threads: int) -> dict:
    alone = pace()
    with ThreadPoolExecutor(threads) as pool, Probe() as probe:
        t0 = time.perf_counter()
        list(pool.map(pipe.prepare_sync, prompts))
        wall = time.perf_counter() - t0
    n = len(prompts)
    waited = sum(max(0.0, r - alone) for r in probe.rounds)
    return {
        "requests": n,
        "threads": threads,
        "ms_per_request": wall / n * 1e3 * threads,  # thread time
        "gil_ms_per_request": waited / n * 1e3,
        "longest_wait_ms": max(probe.rounds, default=0.0) * 1e3,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint (default: a tiny one, written once under /tmp; "
                    "its tokenizer and tiling are the real ones)")
    ap.add_argument("--side", type=int, default=1024)
    ap.add_argument("--n-text", type=int, default=100)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    model = args.model or str(make_checkpoint("/tmp/vlmdeploy-prep-tiny", "tiny", "hf"))
    with pipeline(model, backend_config=PytorchEngineConfig(device_type="cpu")) as pipe:
        warm = workload(pipe.tokenizer, 4, args.side, args.n_text, seed=1)
        list(map(pipe.prepare_sync, warm))
        prompts = workload(pipe.tokenizer, args.n, args.side, args.n_text, seed=2)
        res = measure(pipe, prompts, args.threads)
    print(f"{args.side}x{args.side} JPEG + {args.n_text} text tokens, {res['threads']} thread(s): "
          f"{res['ms_per_request']:.2f} ms a request, GIL held about "
          f"{res['gil_ms_per_request']:.2f} ms of it "
          f"(longest wait {res['longest_wait_ms']:.2f} ms)")
    return res


if __name__ == "__main__":
    main()
