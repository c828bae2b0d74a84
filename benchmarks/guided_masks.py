"""The host cost of structured output: filling a step's token masks for its guided rows.

W3s's guided rows (W3's requests, every fourth held to a three-field JSON schema) are replayed on
the host alone: each step fills the masks of all live rows, then every row takes a random allowed
token (what random weights pick), as in the engine. Reported per step, for ``--rows`` rows: the
milliseconds of filling them (:meth:`vlmdeploy.frontend.guided.Guide.fill_rows`) one row after
another on the calling thread and on llguidance's pool of one thread per CPU
(``VLMDEPLOY_MASK_THREADS``), and of advancing the grammars. The engine fills a guided step's
masks on a thread of their own while its own thread hands the step before over and schedules the
next, and queues the step's sampling at the next launch: this is the time that must hide behind
that work and the device's forward.

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


def replay(preset: str, rows: int, steps: int, threads: int, seed: int = 0) -> dict:
    """``steps`` steps of ``rows`` guided rows; ms per step (median and p90) to fill, the mean to
    advance, and a digest of the tokens chosen."""
    from vlmdeploy.frontend.guided import Guide

    gs, vocab = guides(preset, rows)
    words = (vocab + 31) // 32
    gen = torch.Generator().manual_seed(seed)
    shifts = torch.arange(32, dtype=torch.int32)
    fill, advance, chosen = [], [], hashlib.sha256()
    before = os.environ.get("VLMDEPLOY_MASK_THREADS")
    os.environ["VLMDEPLOY_MASK_THREADS"] = str(threads)
    try:
        for _ in range(steps):
            bitmask = torch.zeros(rows, words, dtype=torch.int32)
            t0 = time.perf_counter()
            Guide.fill_rows(gs, bitmask, list(range(rows)))
            fill.append(time.perf_counter() - t0)
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
    fill.sort()
    return {
        "fill_ms_median": statistics.median(fill) * 1e3,
        "fill_ms_p90": fill[int(0.9 * (len(fill) - 1))] * 1e3,
        "advance_ms_mean": statistics.fmean(advance) * 1e3,
        "tokens_sha256": chosen.hexdigest()[:16],  # equal masks → equal tokens, either way
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="8b")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    affinity = getattr(os, "sched_getaffinity", None)
    result = {
        "preset": args.preset,
        "rows": args.rows,
        "steps": args.steps,
        "cpus": len(affinity(0)) if affinity else os.cpu_count(),
    }
    result |= {
        "one_at_a_time": replay(args.preset, args.rows, args.steps, threads=0),
        "pool": replay(args.preset, args.rows, args.steps, threads=result["cpus"]),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
