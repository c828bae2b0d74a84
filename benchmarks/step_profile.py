"""Where a decode step's time goes: the engine driven by hand at fixed batch sizes.

For each batch size, ``B`` text-only sequences of ``--prompt`` random tokens are added and run
until every one is decoding; then ``--steps`` engine steps are timed as a whole, and a few more
under ``torch.profiler``, whose table (GPU kernels by total time, and host time) is written to
``--out``. The gap between the step time and the GPU-busy time is host time that the GPU waits for.

    python benchmarks/step_profile.py --preset 8b --batch 1,256 --out step_profile.md
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from vlmdeploy import GenerationConfig, PytorchEngineConfig, pipeline
from vlmdeploy.engine.sequence import Sequence


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def profile_batch(pipe, batch: int, prompt: int, steps: int, seed: int = 0) -> str:
    eng = pipe.engine
    gen = torch.Generator().manual_seed(seed)
    vocab = pipe.model_cfg.text.vocab_size
    sampling = pipe.prepare_sync("x", GenerationConfig(max_new_tokens=4096, ignore_eos=True))
    for i in range(batch):
        ids = torch.randint(1000 if vocab > 2000 else 0, min(vocab, 100_000), (prompt,),
                            generator=gen).tolist()
        eng.add(Sequence(1_000_000 + seed * 10_000 + i, ids, copy.copy(sampling.sampling)))
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
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available()
                                           else [])
    with profile(activities=activities) as prof:
        for _ in range(5):
            eng.step()
        sync()
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60)
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
    ap.add_argument("--out", default="step_profile.md")
    args = ap.parse_args()
    model, load_format = args.model, "auto"
    if args.preset:
        from vlmdeploy.testing.checkpoint import make_checkpoint

        model = str(make_checkpoint(f"/tmp/vlmdeploy-step-{args.preset}", args.preset, "hf",
                                    dtype=torch.bfloat16, weights=False))
        load_format = "dummy"
    cfg = PytorchEngineConfig(session_len=8192, load_format=load_format)
    sections = []
    with pipeline(model, backend_config=cfg) as pipe:
        pipe.loop.close()  # the engine is driven by hand from here
        for i, b in enumerate(int(x) for x in args.batch.split(",")):
            sections.append(profile_batch(pipe, b, args.prompt, args.steps, seed=i))
    Path(args.out).write_text("\n".join(sections))


if __name__ == "__main__":
    main()
