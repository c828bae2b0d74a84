"""The host cost of structured output: making a step's token masks for its guided rows.

W3s's guided rows (W3's requests, every fourth held to a three-field JSON schema) are replayed on
the host alone: each step makes the masks of all live rows as the engine makes them
(:class:`vlmdeploy.engine.sampling.GuideMasks`), then every row takes a random allowed token (what
random weights pick). Reported per step, for ``--rows`` rows, in milliseconds: the masks made on
this thread by llguidance's pool of one thread and of one thread per CPU
(``VLMDEPLOY_MASK_THREADS``); the masks made on the engine's mask thread while this thread runs
``--busy-ms`` of pure Python, as the engine thread does meanwhile (hands the step before over,
schedules the next), from the start until they are ready — against ``--busy-ms`` plus the first
figure, what the same work costs one after the other; and advancing the grammars.

    python -m benchmarks.guided_masks --preset 8b --rows 64 --steps 200
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch


def guides(preset: str, rows: int) -> tuple[list, int]:
    """``rows`` fresh guides for W3s's schema on ``preset``'s tokenizer, and its vocabulary size."""
    from transformers import AutoTokenizer

    from benchmarks.engine import W3S_SCHEMA
    from vlmdeploy.config import ModelConfig
    from vlmdeploy.frontend.guided import GuidedDecoding
    from vlmdeploy.testing.checkpoint import make_checkpoint

    path = make_checkpoint(Path(tempfile.mkdtemp()) / preset, preset, "hf", weights=False)
    tok = AutoTokenizer.from_pretrained(path)
    vocab = ModelConfig.from_pretrained(path).text.vocab_size
    guided = GuidedDecoding(tok, vocab)
    fmt = {"type": "json_schema", "json_schema": {"name": "w3s", "schema": W3S_SCHEMA}}
    stop = frozenset({tok.eos_token_id})
    return [guided.guide(fmt, stop).for_request().fork() for _ in range(rows)], vocab


def replay(
    preset: str, rows: int, steps: int, threads: int, seed: int = 0, busy_ms: float = 0.0
) -> dict:
    """``steps`` steps of ``rows`` guided rows; ms per step (median and p90) until the masks are
    ready (beside ``busy_ms`` of Python on this thread when it is given, on the mask thread),
    the mean to advance, and a digest of the tokens chosen."""
    from vlmdeploy.engine.sampling import GuideMasks, SamplingParams

    gs, vocab = guides(preset, rows)
    params = [SamplingParams(guide=g) for g in gs]
    worker = ThreadPoolExecutor(1, thread_name_prefix="masks") if busy_ms else None
    gen = torch.Generator().manual_seed(seed)
    shifts = torch.arange(32, dtype=torch.int32)
    ready, advance, chosen = [], [], hashlib.sha256()
    before = os.environ.get("VLMDEPLOY_MASK_THREADS")
    os.environ["VLMDEPLOY_MASK_THREADS"] = str(threads)
    try:
        for _ in range(steps):
            t0 = time.perf_counter()
            masks = GuideMasks(params, vocab, worker)
            if busy_ms:
                _python_for(busy_ms)
            bitmask = masks.bitmask()
            ready.append(time.perf_counter() - t0)
            allowed = ((bitmask[:, :, None] >> shifts) & 1).bool().flatten(1)[:, :vocab]
            tokens = torch.rand(rows, vocab, generator=gen).masked_fill(~allowed, -1).argmax(-1)
            chosen.update(tokens.numpy().tobytes())
            t0 = time.perf_counter()
            for g, t in zip(gs, tokens.tolist()):
                g.advance(t)
            advance.append(time.perf_counter() - t0)
    finally:
        if before is None:
            os.environ.pop("VLMDEPLOY_MASK_THREADS")
        else:
            os.environ["VLMDEPLOY_MASK_THREADS"] = before
        if worker is not None:
            worker.shutdown()
    ready.sort()
    return {
        "ready_ms_median": statistics.median(ready) * 1e3,
        "ready_ms_p90": ready[int(0.9 * (len(ready) - 1))] * 1e3,
        "advance_ms_mean": statistics.fmean(advance) * 1e3,
        "tokens_sha256": chosen.hexdigest()[:16],  # equal masks → equal tokens, every way
    }


def _python_for(ms: float) -> None:
    """Run Python bytecode (holding the GIL but for the interpreter's switches) for ``ms``."""
    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        sum(range(100))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="8b")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--busy-ms", type=float, default=3.0,
                    help="Python run beside the mask thread each step (the engine thread's work)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    affinity = getattr(os, "sched_getaffinity", None)
    result = {
        "preset": args.preset,
        "rows": args.rows,
        "steps": args.steps,
        "cpus": len(affinity(0)) if affinity else os.cpu_count(),
    }
    one = replay(args.preset, args.rows, args.steps, threads=1)
    result |= {
        "one_thread": one,
        "pool": replay(args.preset, args.rows, args.steps, threads=result["cpus"]),
        "beside_python": replay(args.preset, args.rows, args.steps, 1, busy_ms=args.busy_ms),
        "busy_ms": args.busy_ms,
        "one_after_the_other_ms": args.busy_ms + one["ready_ms_median"],
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
