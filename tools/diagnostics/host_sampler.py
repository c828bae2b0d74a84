"""Where the engine thread's host time goes while a batch run starts: a sampling profiler.

A sampler thread reads the engine thread's Python stack every INTERVAL (``sys._current_frames``)
during the first SECONDS of a W2- or W3-style run through ``pipe()`` and reports the lines it was
found on, innermost first and by the innermost vlmdeploy frame, with the step records' launch times
beside. A sample inside a C call (a launch, a copy) cannot tell work from waiting for the GIL; the
step records and ``tools/diagnostics/prep_gil.py`` tell those apart.

    python -m tools.diagnostics.host_sampler --preset 8b --side 448 --n-text 30 --n-out 512 --n 256
"""

from __future__ import annotations

import argparse
import collections
import importlib
import sys
import threading
import time
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import vlmdeploy
from benchmarks.workloads import gen, model_source, sync, workload
from vlmdeploy import PytorchEngineConfig, pipeline

ROOT = str(Path(vlmdeploy.__file__).resolve().parent)


class StackSampler:
    """Samples one thread's stack every ``interval`` seconds for at most ``seconds``."""

    def __init__(self, thread: threading.Thread, interval: float, seconds: float):
        self.target, self.interval, self.seconds = thread.ident, interval, seconds
        self.samples: list[list[tuple[str, int, str]]] = []  # innermost frame first
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        end = time.perf_counter() + self.seconds
        while not self._stop.is_set() and time.perf_counter() < end:
            frame = sys._current_frames().get(self.target)
            stack = []
            while frame is not None:
                code = frame.f_code
                stack.append((code.co_filename, frame.f_lineno, code.co_name))
                frame = frame.f_back
            self.samples.append(stack)
            time.sleep(self.interval)

    def __enter__(self) -> StackSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class SyncWarnings:
    """With ``on`` and a GPU: PyTorch warns at every operation that makes the host wait for the
    GPU; count them by the innermost vlmdeploy frame of the thread that waited."""

    def __init__(self, on: bool):
        self.on = on and torch.cuda.is_available()
        self.places: collections.Counter = collections.Counter()

    def _show(self, message, category, *args, **kwargs) -> None:
        stack = traceback.extract_stack()[:-1]
        ours = [f for f in stack if f.filename.startswith(ROOT)]
        place = where((ours[-1].filename, ours[-1].lineno, ours[-1].name)) if ours else "(other)"
        self.places[(threading.current_thread().name, place)] += 1

    def __enter__(self) -> SyncWarnings:
        if self.on:
            self._saved = warnings.showwarning
            warnings.showwarning = self._show
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc) -> None:
        if self.on:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = self._saved
            warnings.resetwarnings()

    def report(self) -> str:
        if not self.on:
            return ""
        lines = ["", "Operations that waited for the GPU:", "", "| thread | place | count |",
                 "|---|---|---:|"]
        lines += [f"| {t} | {p} | {n} |" for (t, p), n in self.places.most_common(20)]
        return "\n".join(lines) + "\n"


# Engine-thread calls whose host time each step reports (module, attribute path). These name the
# engine's own functions, so they follow its code: a renamed function fails loudly here.
TIMED = (
    ("vlmdeploy.engine.scheduler", "Scheduler.schedule"),
    ("vlmdeploy.engine.vision", "VisionStage.attach_embeddings"),
    ("vlmdeploy.engine.vision", "_one_batch"),
    ("vlmdeploy.engine.model_runner", "ModelRunner.forward"),
    ("vlmdeploy.engine.model_runner", "pack"),
    ("vlmdeploy.engine.model_runner", "ModelRunner.forward_eager"),
    ("vlmdeploy.engine.llm_engine", "sample_async"),
    ("vlmdeploy.engine.llm_engine", "LLMEngine._read"),
)


class CallTimer:
    """Wraps the callables of ``TIMED`` so that each call made on ``thread`` records (name, start,
    seconds, seconds of the thread's own CPU time: far less than the wall means it waited, for
    the GIL, a lock or the GPU); restores them on exit."""

    def __init__(self, thread: threading.Thread, targets=TIMED):
        self.target, self.targets = thread.ident, targets
        self.calls: list[tuple[str, float, float, float]] = []
        self._saved: list[tuple[object, str, object]] = []

    def _wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            if threading.get_ident() != self.target:
                return fn(*args, **kwargs)
            t, cpu = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                end = time.perf_counter()
                self.calls.append((name, t, end - t, time.thread_time() - cpu))
        return timed

    def __enter__(self) -> CallTimer:
        for module, path in self.targets:
            owner = importlib.import_module(module)
            *parents, attr = path.split(".")
            for p in parents:
                owner = getattr(owner, p)
            fn = owner.__dict__[attr]
            self._saved.append((owner, attr, fn))
            setattr(owner, attr, self._wrap(path, fn))
        return self

    def __exit__(self, *exc) -> None:
        for owner, attr, fn in reversed(self._saved):
            setattr(owner, attr, fn)

    def names(self) -> list[str]:
        return [path for _, path in self.targets]

    def per_step(self, start: float, end: float) -> dict[str, tuple[float, float]]:
        """(wall ms, CPU ms) of each timed call that started within [start, end)."""
        out = {n: (0.0, 0.0) for n in self.names()}
        for name, t, dt, cpu in self.calls:
            if start <= t < end:
                wall, own = out[name]
                out[name] = (wall + dt * 1e3, own + cpu * 1e3)
        return out


def where(frame: tuple[str, int, str]) -> str:
    path, line, name = frame
    short = path[len(ROOT) - len("vlmdeploy"):] if path.startswith(ROOT) else Path(path).name
    return f"{short}:{line} {name}"


def report(samples: list, top: int = 20) -> str:
    n = len(samples)
    if not n:
        return "no samples\n"
    inner = collections.Counter(where(s[0]) for s in samples if s)
    ours = collections.Counter(
        next((where(f) for f in s if f[0].startswith(ROOT)), "(outside vlmdeploy)") for s in samples
    )
    within = collections.Counter()  # samples inside each vlmdeploy function, at any depth
    for s in samples:
        within.update({f"{where(f).split(':')[0]} {f[2]}" for f in s if f[0].startswith(ROOT)})
    lines = [f"{n} samples", "", "| vlmdeploy function (anywhere on the stack) | share |",
             "|---|---:|"]
    lines += [f"| {k} | {100 * v / n:.1f}% |" for k, v in within.most_common(top)]
    lines += ["", "| innermost frame | share |", "|---|---:|"]
    lines += [f"| {k} | {100 * v / n:.1f}% |" for k, v in inner.most_common(top)]
    lines += ["", "| innermost vlmdeploy frame | share |", "|---|---:|"]
    lines += [f"| {k} | {100 * v / n:.1f}% |" for k, v in ours.most_common(top)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--preset", help="write config + tokenizer of this size, dummy weights")
    ap.add_argument("--device-type", default=None, help="cuda or cpu (default: the engine's)")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--side", type=int, default=448)
    ap.add_argument("--n-text", type=int, default=30)
    ap.add_argument("--n-out", type=int, default=512)
    ap.add_argument("--seconds", type=float, default=1.5, help="sample this long from the start")
    ap.add_argument("--interval", type=float, default=0.001)
    ap.add_argument("--steps", type=int, default=12, help="step records to list")
    ap.add_argument("--prep-workers", type=int, help="threads preparing requests (default: the "
                    "pipeline's own choice)")
    ap.add_argument("--sync-debug", action="store_true", help="also count the operations that "
                    "make the host wait for the GPU (torch.cuda.set_sync_debug_mode), by place")
    ap.add_argument("--switch-interval", type=float, help="sys.setswitchinterval, seconds (how "
                    "long a thread waiting for the GIL waits before asking for it)")
    ap.add_argument("--out", help="also write the report here")
    args = ap.parse_args(argv)
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    model, load_format = model_source(args.model, args.preset)
    extra = {"device_type": args.device_type} if args.device_type else {}
    cfg = PytorchEngineConfig(session_len=8192, load_format=load_format, **extra)
    with pipeline(model, backend_config=cfg) as pipe:
        tok = pipe.tokenizer
        if args.prep_workers:
            pipe.preparer.pool.shutdown()
            pipe.preparer.pool = ThreadPoolExecutor(args.prep_workers,
                                                    thread_name_prefix="vlmdeploy-prep")
        pipe(workload(tok, 4, args.side, args.n_text, 7), gen_config=gen(8))  # warm-up
        prompts = workload(tok, args.n, args.side, args.n_text, 11)
        engine_thread = pipe.engine.thread  # this pipeline's: other engines may run beside it
        sync()
        pipe.engine.observer.record_steps()
        with StackSampler(engine_thread, args.interval, args.seconds) as sampler, \
                SyncWarnings(args.sync_debug) as syncs, CallTimer(engine_thread) as timer:
            t0 = time.perf_counter()
            pipe(prompts, gen_config=gen(args.n_out))
            wall = time.perf_counter() - t0
        trace = pipe.engine.observer.take_records()
        workers = pipe.preparer.pool._max_workers
    names = timer.names()
    steps = ["| start ms | step ms | launch ms | decode rows | prefill tokens | tiles | "
             + " | ".join(f"{n} ms (wall/CPU)" for n in names) + " |",
             "|---:|---:|---:|---:|---:|---:|" + "---:|" * len(names)]
    for r in trace[: args.steps]:
        spent = timer.per_step(r.start, r.end)
        steps.append(f"| {(r.start - t0) * 1e3:.1f} | {(r.end - r.start) * 1e3:.1f} | "
                     f"{(r.launched - r.start) * 1e3:.1f} | {r.num_decode} | "
                     f"{r.num_prefill_tokens} | {r.num_tiles} | "
                     + " | ".join(f"{spent[n][0]:.1f}/{spent[n][1]:.1f}" for n in names) + " |")
    text = (f"### {args.n} requests, {args.side}² JPEG + {args.n_text} text tokens, {args.n_out} "
            f"out, {workers} preparation threads, switch interval "
            f"{sys.getswitchinterval() * 1e3:g} ms: wall {wall:.2f} s; engine thread sampled for "
            f"the first {args.seconds} s\n\n"
            + "\n".join(steps) + "\n\n" + report(sampler.samples) + syncs.report())
    print(text, flush=True)
    if args.out:
        Path(args.out).write_text(text)
    return text


if __name__ == "__main__":
    main()
