"""Where a decode step's time goes: the engine driven by hand at fixed batch sizes.

For each batch size, ``B`` text-only sequences of ``--prompt`` random tokens are added and run
until every one is decoding; then ``--steps`` engine steps are timed as a whole, and a few more
under ``torch.profiler``, whose table (GPU kernels by total time, and host time) is written to
``--out``. The gap between the step time and the GPU-busy time is host time that the GPU waits for.
``--prefill N:SIDE`` also times N image requests (distinct SIDE x SIDE JPEG data URLs, ~30 text
tokens, W1's shape for 1:448 and W2's for 1:1024) through preparation (decode, tile, tokens) and
their prefill steps (vision encoder and prompt), with the same kernel table. ``--trace DIR``
writes a Chrome trace of each profiled section. On Hopper the decode kernels are launched with
programmatic dependent launch: each starts while the one before drains and waits inside, so the
table's kernel times overlap and add up to more than the step. ``VLMDEPLOY_PDL=0`` gives additive
times (and a slightly slower step).

    python -m tools.diagnostics.step_profile --preset 8b --batch 1,256 --prefill 1:448,8:1024 \
        --out step_profile.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.workloads import jpeg_url, model_source, request
from vlmdeploy import GenerationConfig, PytorchEngineConfig, pipeline
from vlmdeploy.engine.io import EngineRequest


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def kernel_table(prof) -> str:
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60)


def activities() -> list:
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])


def profile_prefill(pipe, eng, n: int, side: int, trace: str | None, seed: int = 0) -> str:
    """Preparation and prefill of ``n`` image requests, as W1 (1 x 448) or W2 (n x 1024) see it."""
    rng = np.random.default_rng(seed)
    gen = GenerationConfig(max_new_tokens=2, ignore_eos=True)
    prompts = [request(jpeg_url(side, rng), "Describe the picture in a few words please.")
               for _ in range(n + 1)]
    warm = pipe.prepare_sync(prompts[-1], gen)  # one warm-up request (autotuning, allocator)
    eng.add(EngineRequest(2_000_000 + seed * 1000, warm.token_ids, warm.sampling, warm.images))
    while eng.has_work():
        eng.step()
    sync()
    t = time.perf_counter()
    reqs = [pipe.prepare_sync(p, gen) for p in prompts[:n]]
    prep_ms = (time.perf_counter() - t) / n * 1e3
    for i, req in enumerate(reqs):
        eng.add(EngineRequest(2_000_001 + seed * 1000 + i, req.token_ids, req.sampling, req.images))
    sync()
    steps, t = 0, time.perf_counter()
    with profile(activities=activities()) as prof:
        while any(s.num_output == 0 for s in eng.scheduler.running) or eng.scheduler.waiting:
            eng.step()
            steps += 1
        sync()
    wall_ms = (time.perf_counter() - t) * 1e3
    if trace:
        prof.export_chrome_trace(str(Path(trace) / f"prefill-{n}x{side}.json"))
    for s in list(eng.scheduler.running):
        eng.abort(s.seq_id)
    tokens = sum(len(r.token_ids) for r in reqs)
    tiles = sum(len(im.pixels()) for r in reqs for im in r.images)
    head = (f"### prefill: {n} request(s) with a {side}x{side} JPEG ({tiles} tiles, {tokens} "
            f"prompt tokens): preparation {prep_ms:.1f} ms per request (one thread), prefill "
            f"{wall_ms:.1f} ms in {steps} step(s) to every first token (under the profiler)\n")
    print(head, flush=True)
    return head + "\n```\n" + kernel_table(prof) + "\n```\n"


def profile_batch(pipe, eng, batch: int, prompt: int, steps: int, seed: int = 0,
                  trace: str | None = None) -> str:
    gen = torch.Generator().manual_seed(seed)
    vocab = pipe.model_cfg.text.vocab_size
    sampling = pipe.prepare_sync("x", GenerationConfig(max_new_tokens=4096, ignore_eos=True))
    for i in range(batch):
        ids = torch.randint(1000 if vocab > 2000 else 0, min(vocab, 100_000), (prompt,),
                            generator=gen).tolist()
        eng.add(EngineRequest(1_000_000 + seed * 10_000 + i, ids, sampling.sampling))
    warm = 0
    while any(s.num_computed < s.num_prompt_tokens for s in eng.scheduler.running) or \
            eng.scheduler.waiting:
        eng.step()
        warm += 1
    for _ in range(5):
        eng.step()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        eng.step()
    sync()
    per_step = (time.perf_counter() - t) / steps * 1e3
    with profile(activities=activities()) as prof:
        for _ in range(5):
            eng.step()
        sync()
    if trace:
        prof.export_chrome_trace(str(Path(trace) / f"decode-{batch}.json"))
    table = kernel_table(prof)
    for s in list(eng.scheduler.running):
        eng.abort(s.seq_id)
    head = (f"### batch {batch}, prompt {prompt} tokens: {per_step:.2f} ms per step "
            f"({steps} steps; {warm} prefill steps before; profiler table over 5 steps)\n")
    print(head, flush=True)
    return head + "\n```\n" + table + "\n```\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--preset", help="write config + tokenizer of this size, dummy weights")
    ap.add_argument("--batch", default="1,256")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--prefill", default="", help="N:SIDE[,N:SIDE...] image prefills to time")
    ap.add_argument("--trace", help="directory for Chrome traces of each profiled section")
    ap.add_argument("--out", default="step_profile.md")
    args = ap.parse_args()
    model, load_format = model_source(args.model, args.preset)
    cfg = PytorchEngineConfig(session_len=8192, load_format=load_format)
    sections = []
    with pipeline(model, backend_config=cfg) as pipe:
        eng = pipe.engine.detach()  # the engine is driven by hand from here
        if args.trace:
            Path(args.trace).mkdir(parents=True, exist_ok=True)
        for i, spec in enumerate(x for x in args.prefill.split(",") if x):
            n, side = (int(v) for v in spec.split(":"))
            sections.append(profile_prefill(pipe, eng, n, side, args.trace, seed=i))
        for i, b in enumerate(int(x) for x in args.batch.split(",") if x):
            sections.append(profile_batch(pipe, eng, b, args.prompt, args.steps, seed=i,
                                          trace=args.trace))
    Path(args.out).write_text("\n".join(sections))


if __name__ == "__main__":
    main()
