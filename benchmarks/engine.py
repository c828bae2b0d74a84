"""Engine benchmarks W1–W3 (DESIGN §5), W4 and a two-turn chat (InternVL3.5, no EOS).

* W1 latency: 1 request, one 448×448 image + ~30 text tokens, 512 output tokens, through
  ``stream_infer`` → TTFT and mean TPOT (and the weight bandwidth that TPOT implies).
* chat2 multi-turn: one 1024×1024 JPEG + ~30 text tokens, 64 output tokens; then the same
  conversation + the assistant's answer + ~30 new text tokens → TTFT of both turns (submit →
  first streamed chunk with a token), their ratio, and the prompt tokens turn 2 found in the prefix
  cache.
* W2 image-heavy: N requests, each a distinct 1024×1024 JPEG (10 tiles, 2,560 image tokens) + ~100
  text tokens, 100 output tokens, through ``infer`` → requests/s, input and output tokens/s.
* W3 decode-heavy: N requests, each a distinct 448×448 JPEG + ~30 text tokens, 512 output tokens →
  output tokens/s.
* W3s, W3 with structured output mixed in: the same requests, every 4th constrained to a JSON
  schema (``response_format``), all of them 512 tokens (the constrained ones end their grammar
  and then only an end token is allowed) → output tokens/s, to set beside W3's in the same run.
* W4 mixed traffic (``benchmarks/w4.py``): N requests of 0–4 images of assorted sizes and aspect
  ratios (1–13 tiles each), 20–2,000 text tokens, 16–1,024 output tokens, greedy or sampled with
  their own settings, some repeating an image or a system prompt, some second turns →
  requests/s and output tokens/s.

Images travel as base64 ``data:image/jpeg`` URLs inside OpenAI-style messages, so JPEG decoding,
tiling and normalisation are inside the timed region, as for the reference system's harness. Each
workload runs once after a warm-up of the same shape (chat2's warm-up is a two-turn chat on another
image). A workload that fails records its error and the next one runs; ``--time-limit`` skips the
workloads that would start after it. With ``--baseline`` the transformers reference (``generate``,
SDPA) is measured in the same process for W1-shaped decoding, after the engine has been released.

The run's numbers are appended to a results CSV (``--csv``, see ``benchmarks/results.py``) stamped
with date, time, commit and device line; ``--out`` writes the table for the reader of the run.

    python -m benchmarks.engine --model /tmp/ivl8b-hf --baseline --json engine.json \\
        --csv results.csv --out engine.md --lmdeploy results.json
    python -m benchmarks.engine --preset 8b          # config + tokenizer only, dummy weights
    python -m benchmarks.engine --render engine.json --out engine.md   # table of saved results
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks.baseline import transformers_w1
from benchmarks.decode_floor import floor_report
from benchmarks.engine_report import summary_line, write_outputs
from benchmarks.results import current_commit, device_line
from benchmarks.step_stats import GcPauses, timeline, token_gaps, ttft_parts
from benchmarks.w4 import W4Spec, w4_requests
from benchmarks.w4 import summary as w4_summary
from benchmarks.workloads import (
    gen,
    jpeg_url,
    model_source,
    request,
    shape_name,
    sync,
    text_of,
    workload,
)
from vlmdeploy import GenerationConfig, PytorchEngineConfig, pipeline
from vlmdeploy.vl.constants import IMAGE_TOKEN
from vlmdeploy.vl.tiling import as_pixel_values

WORKLOADS = ("w1", "chat2", "w2", "w3", "w3s", "w4")  # the order they run in

_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[engine.py +{time.monotonic() - _T0:6.1f}s] {msg}", flush=True)


def run_w1(pipe, tok, ttft_runs: int = 11) -> dict:
    """TPOT from one 512-token request; TTFT as the median of ``ttft_runs`` requests (that one
    and shorter ones), each with its own image so no cache helps."""
    list(pipe.stream_infer([workload(tok, 1, 448, 30, seed=2)[0]], gen_config=gen(16)))  # warm-up
    sync()
    observer = pipe.engine.observer
    with GcPauses() as pauses:
        ttfts, parts = [], []
        for i in range(ttft_runs - 1):
            prompt = workload(tok, 1, 448, 30, seed=100 + i)[0]
            observer.record_steps()
            t0 = time.perf_counter()
            for r in pipe.stream_infer([prompt], gen_config=gen(2)):
                if r.token_ids:
                    ttfts.append(time.perf_counter() - t0)
                    break
            sync()
            parts.append(ttft_parts(observer.take_records(), t0, ttfts[-1]))
        prompt = workload(tok, 1, 448, 30, seed=1)[0]
        stamps, t0 = [], time.perf_counter()
        for r in pipe.stream_infer([prompt], gen_config=gen(512)):
            stamps.append((time.perf_counter(), len(r.token_ids)))
        first = next(t for t, n in stamps if n)
        ttfts.append(first - t0)
        n_out = sum(n for _, n in stamps)
        tpot = (stamps[-1][0] - first) / max(1, n_out - 1)
    gaps = [b - a for (a, n), (b, _) in zip(stamps, stamps[1:]) if n]
    return pauses.summary() | {
        "ttft_ms": statistics.median(ttfts) * 1e3,
        "ttft_min_ms": min(ttfts) * 1e3,
        "ttft_max_ms": max(ttfts) * 1e3,
        "ttft_runs": len(ttfts),
        "ttft_parts_ms": {k: round(statistics.median(p[k] for p in parts), 2) for k in parts[0]},
        "tpot_ms": tpot * 1e3,
        "output_tokens": n_out,
    } | token_gaps(gaps)


def chat_turn(pipe, messages: list[dict], n_out: int) -> dict:
    """One streamed turn: TTFT (submit → first chunk with a token), the answer, cached tokens."""
    pipe.engine.observer.record_steps()
    t0, first, parts, cached, n_in, n_gen = time.perf_counter(), None, [], 0, 0, 0
    for r in pipe.stream_infer([messages], gen_config=gen(n_out)):
        if first is None and r.token_ids:
            first = time.perf_counter()
        parts.append(r.text)
        cached, n_in = max(cached, r.cached_tokens), r.input_token_len
        n_gen = max(n_gen, r.generate_token_len)
        if r.error_message:
            raise RuntimeError(f"chat turn failed: {r.error_message}")
    trace = pipe.engine.observer.take_records()
    if first is None:
        raise RuntimeError("the chat turn streamed no token")
    return {
        "ttft_ms": (first - t0) * 1e3,
        "ttft_parts_ms": {k: round(v, 2) for k, v in ttft_parts(trace, t0, first - t0).items()},
        "tiles_encoded": sum(r.num_tiles for r in trace),  # 0 when the embedding cache served it
        "text": "".join(parts),
        "cached_tokens": cached,
        "input_tokens": n_in,
        "output_tokens": n_gen,
    }


def two_turn_chat(pipe, tok, seed: int, side: int = 1024, n_text: int = 30, n_out: int = 64):
    rng = np.random.default_rng(seed)
    first = request(jpeg_url(side, rng), text_of(tok, n_text, rng))
    follow_up = text_of(tok, n_text, rng)
    t1 = chat_turn(pipe, first, n_out)
    answer = t1["text"].replace(IMAGE_TOKEN, "")  # random text must not look like a placeholder
    second = [
        *first,
        {"role": "assistant", "content": answer},
        {"role": "user", "content": follow_up},
    ]
    return t1, chat_turn(pipe, second, n_out)


def run_chat2(pipe, tok) -> dict:
    two_turn_chat(pipe, tok, seed=41)  # warm-up on another image
    sync()
    return two_turn_summary(*two_turn_chat(pipe, tok, seed=40))


def two_turn_summary(t1: dict, t2: dict) -> dict:
    """The result of a two-turn chat from its turns (:func:`chat_turn`'s dicts)."""
    return {
        "ttft1_ms": t1["ttft_ms"],
        "ttft2_ms": t2["ttft_ms"],
        "ratio": t2["ttft_ms"] / t1["ttft_ms"],
        "ttft1_parts_ms": t1["ttft_parts_ms"],
        "ttft2_parts_ms": t2["ttft_parts_ms"],
        "turn2_tiles_encoded": t2["tiles_encoded"],
        "cached_tokens": t2["cached_tokens"],
        "turn1_input_tokens": t1["input_tokens"],
        "turn2_input_tokens": t2["input_tokens"],
        "turn1_cached_tokens": t1["cached_tokens"],
        "output_tokens": [t1["output_tokens"], t2["output_tokens"]],
    }


def run_batch(pipe, tok, n: int, side: int, n_text: int, n_out: int, seed: int) -> dict:
    pipe(workload(tok, 1, side, n_text, seed + 1000), gen_config=gen(n_out))  # warm-up
    return timed_batch(pipe, workload(tok, n, side, n_text, seed), [gen(n_out)] * n)


# What W3s asks of its constrained requests: an object of a few typed fields, as an extraction
# or agent workload would.
W3S_SCHEMA = {
    "type": "object",
    "properties": {
        "caption": {"type": "string"},
        "objects": {"type": "array", "items": {"type": "string"}},
        "count": {"type": "integer"},
    },
    "required": ["caption", "objects", "count"],
}


def run_w3s(pipe, tok, n: int, seed: int, every: int = 4) -> dict:
    """W3 with every ``every``-th request constrained to W3S_SCHEMA: throughput of the whole
    batch and of the unconstrained requests alone (their tokens over the batch's wall time)."""
    fmt = {"type": "json_schema", "json_schema": {"name": "w3s", "schema": W3S_SCHEMA}}
    guided = GenerationConfig(max_new_tokens=512, ignore_eos=True, response_format=fmt)
    warm = workload(tok, 2, 448, 30, seed + 1000)
    pipe(warm, gen_config=[gen(512), guided])
    prompts = workload(tok, n, 448, 30, seed)
    configs = [guided if i % every == every - 1 else gen(512) for i in range(n)]
    res = timed_batch(pipe, prompts, configs)
    free = [i for i, c in enumerate(configs) if c.response_format is None]
    res["guided_requests"] = n - len(free)
    res["unconstrained_output_tokens_per_s"] = (
        res["output_tokens_per_s"] * len(free) / n if n else 0.0)  # every request is 512 tokens
    return res


def run_w4(pipe, tok, n: int, seed: int) -> dict:
    """W4, mixed traffic (benchmarks/w4.py): each request its own images, lengths and sampling.
    Sessions under 8,192 tokens get the mix scaled down to fit."""
    session = pipe.session_len
    warm = w4_requests(tok, seed + 1000, W4Spec.for_session(session, 2))
    pipe([m for m, _ in warm], gen_config=[GenerationConfig(**g) for _, g in warm])
    reqs = w4_requests(tok, seed, W4Spec.for_session(session, n))
    res = timed_batch(pipe, [m for m, _ in reqs], [GenerationConfig(**g) for _, g in reqs])
    return res | {"mix": w4_summary(reqs)}


def timed_batch(pipe, prompts: list, configs: list[GenerationConfig]) -> dict:
    """All ``prompts`` submitted at once, each with its config; throughput over the wall time."""
    sync()
    pipe.engine.observer.record_steps()  # the engine thread keeps one record per step
    with GcPauses() as pauses:
        t0 = time.perf_counter()
        out = pipe(prompts, gen_config=configs)
        wall = time.perf_counter() - t0
    trace = pipe.engine.observer.take_records()
    n_in, n_gen = sum(r.input_token_len for r in out), sum(r.generate_token_len for r in out)
    return {
        "requests": len(prompts),
        "wall_s": wall,
        "requests_per_s": len(prompts) / wall,
        "input_tokens_per_s": n_in / wall,
        "output_tokens_per_s": n_gen / wall,
        "short_outputs": sum(r.generate_token_len != c.max_new_tokens
                             for r, c in zip(out, configs)),
        "timeline": timeline(trace, t0, t0 + wall) | pauses.summary(),
    }


def repeated(fn: Callable[[int], dict], times: int, key: str) -> dict:
    """Run a batch workload ``times`` times in a row, run i on its own images and texts
    (``fn(i)``: a repeated prompt would hit the prefix and embedding caches): the run with the
    median ``key`` (the lower middle for an even count), plus every run's ``key`` in ``runs``. The
    first run of a process also pays one-off costs, as a fresh server would."""
    results = [fn(i) for i in range(times)]
    order = sorted(range(times), key=lambda i: results[i][key])
    out = dict(results[order[(times - 1) // 2]])
    out["runs"] = [round(r[key], 2) for r in results]
    out["run_timelines"] = [r.get("timeline") for r in results]
    return out


# ---- running -------------------------------------------------------------------------------


def stage(res: dict, name: str, fn: Callable[[], dict], deadline: float, save) -> None:
    """Run one workload; record its result, or its error, or that the time limit skipped it."""
    if time.monotonic() > deadline:
        res[name] = {"skipped": "time limit reached before it started"}
        log(f"{name}: skipped (time limit)")
        save()
        return
    res[name] = {"error": "started but did not finish (killed by a timeout?)"}
    save()  # what a killed run leaves behind says so
    t = time.perf_counter()
    try:
        r = fn()
    except Exception as exc:  # one failure must not lose the other workloads
        traceback.print_exc()
        res[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        log(f"{name}: ERROR {res[name]['error']}")
        save()
        return
    r["stage_s"] = round(time.perf_counter() - t, 1)
    res[name] = r
    save()
    try:
        log(f"{name}: {summary_line(name, r)} [{r['stage_s']} s]")
    except Exception:
        log(f"{name}: {r}")


def decode_bandwidth() -> float | None:
    """The copy bandwidth W1's decode step is judged against (benchmarks.decode_floor); None
    without a GPU."""
    if not torch.cuda.is_available():
        return None
    from benchmarks.gpu_timing import copy_bandwidth

    bandwidth = copy_bandwidth()
    torch.cuda.empty_cache()
    return bandwidth


def kv_cache_tokens(pipe) -> int:
    core = pipe.engine.core
    return core.num_blocks * core.cfg.block_size


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint directory")
    ap.add_argument("--preset", help="write config + tokenizer of this size and use dummy weights")
    ap.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    ap.add_argument("--model-format", choices=["hf", "fp8", "awq"],
                    help="quantised weights (docs/quantization.md); default: the checkpoint's. "
                    "With --preset, awq makes the preset an AWQ checkpoint")
    ap.add_argument("--quant-policy", type=int, default=0, choices=[0, 4, 8, 16],
                    help="KV cache quantisation, LMDeploy's values: 8 int8, 4 int4, 16 fp8")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="of " + ",".join(WORKLOADS))
    ap.add_argument("--n2", type=int, default=256)
    ap.add_argument("--n3", type=int, default=256)
    ap.add_argument("--n4", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=1, help="runs of W2 and W3 (median reported)")
    ap.add_argument("--session-len", type=int, default=8192)
    ap.add_argument(
        "--prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="enable_prefix_caching of the engine (default on)",
    )
    ap.add_argument("--cache-max-entry-count", type=float, default=0.8)
    ap.add_argument(
        "--time-limit",
        type=float,
        default=0.0,
        help="seconds; 0: none. Workloads (and the baseline) that would start after it are skipped",
    )
    ap.add_argument("--baseline", action="store_true", help="also time transformers on W1")
    ap.add_argument("--model-shape", help="the architecture's name in the results history "
                    "(default: from --preset, else the checkpoint folder's name)")
    ap.add_argument("--json", help="write raw results here (rewritten after every workload)")
    ap.add_argument("--csv", help="append the run's rows to this results CSV")
    ap.add_argument("--out", help="write the results table (markdown) to this file")
    ap.add_argument("--render", metavar="JSON",
                    help="only redo the table (and the CSV rows, with --csv) of saved results")
    ap.add_argument("--lmdeploy", help="results.json of the reference harness")
    ap.add_argument(
        "--lmdeploy-note",
        help="printed under the table; marks the LMDeploy column as quoted from an earlier run "
        "(without --lmdeploy, the numbers of ../shared/anchors/lmdeploy/RESULTS.md)",
    )
    ap.add_argument("--lmdeploy-label", help="heading of the LMDeploy column")
    args = ap.parse_args(argv)
    unknown = set(args.workloads.split(",")) - set(WORKLOADS) - {""}
    if unknown:
        ap.error(f"unknown workloads {sorted(unknown)}; known: {', '.join(WORKLOADS)}")
    if not (args.model or args.preset or args.render):
        ap.error("one of --model, --preset, --render is needed")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.render:
        print(write_outputs(json.loads(Path(args.render).read_text()), args), flush=True)
        return
    deadline = _T0 + args.time_limit if args.time_limit > 0 else math.inf
    model, load_format = model_source(args.model, args.preset, args.load_format,
                                      args.model_format)
    cfg = PytorchEngineConfig(
        session_len=args.session_len,
        load_format=load_format,
        model_format=args.model_format,
        quant_policy=args.quant_policy,
        enable_prefix_caching=args.prefix_caching,
        cache_max_entry_count=args.cache_max_entry_count,
    )
    now = datetime.datetime.now(datetime.timezone.utc)
    res: dict = {
        "date": now.date().isoformat(),
        "time_utc": now.strftime("%H:%M:%S"),
        "commit": current_commit(),
        "device": device_line(),
        "model": model,
        "model_shape": args.model_shape
        or (shape_name(args.preset) if args.preset else Path(model).name),
        "load_format": load_format,
        "settings": {
            "session_len": args.session_len,
            "enable_prefix_caching": args.prefix_caching,
            "cache_max_entry_count": args.cache_max_entry_count,
            "model_format": args.model_format,
            "quant_policy": args.quant_policy,
            "n2": args.n2,
            "n3": args.n3,
            "workloads": args.workloads,
        },
    }

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))

    todo = set(args.workloads.split(","))
    cuda = torch.cuda.is_available()
    log(f"device: {res['device']}; loading {model}")
    w1_req = None
    bandwidth = decode_bandwidth() if "w1" in todo else None  # before the engine takes memory
    t = time.perf_counter()
    try:
        pipe = pipeline(model, backend_config=cfg)
    except Exception as exc:
        traceback.print_exc()
        res["engine"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        pipe = None
    res["init_s"] = round(time.perf_counter() - t, 1)
    if pipe is not None:
        try:
            tok = pipe.tokenizer
            res["kv_tokens"] = kv_cache_tokens(pipe)
            res["startup"] = dict(pipe.engine.observer.startup)
            log(f"engine up in {res['init_s']} s; KV cache {res['kv_tokens']:,} tokens; "
                f"start-up stages {res['startup']}")
            save()
            try:
                w1_req = pipe.prepare_sync(workload(tok, 1, 448, 30, seed=1)[0], gen(1))
            except Exception:
                traceback.print_exc()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            runs = {
                "w1": lambda: run_w1(pipe, tok),
                "chat2": lambda: run_chat2(pipe, tok),
                "w2": lambda: repeated(
                    lambda i: run_batch(pipe, tok, args.n2, 1024, 100, 100, seed=20 + 100 * i),
                    args.repeats, "requests_per_s"),
                "w3": lambda: repeated(
                    lambda i: run_batch(pipe, tok, args.n3, 448, 30, 512, seed=30 + 100 * i),
                    args.repeats, "output_tokens_per_s"),
                "w3s": lambda: repeated(
                    lambda i: run_w3s(pipe, tok, args.n3, seed=50 + 100 * i),
                    args.repeats, "output_tokens_per_s"),
                "w4": lambda: repeated(
                    lambda i: run_w4(pipe, tok, args.n4, seed=40 + 100 * i),
                    args.repeats, "output_tokens_per_s"),
            }
            for name in WORKLOADS:
                if name in todo:
                    stage(res, name, runs[name], deadline, save)
                if name == "w1" and bandwidth and "tpot_ms" in res.get("w1", {}):
                    try:
                        res["w1"] |= floor_report(pipe.engine.core.runner.model.language_model,
                                                  bandwidth, res["w1"]["tpot_ms"])
                    except Exception:  # a report line, not worth the run
                        traceback.print_exc()
        finally:
            if cuda:  # no GPU, no peak to report (the table and the CSV leave it out)
                res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                res["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
                log(
                    f"peak GPU memory {res['peak_gib']:.1f} GiB allocated, "
                    f"{res['peak_reserved_gib']:.1f} GiB reserved"
                )
            try:
                pipe.close()
            except Exception:  # the table still gets written
                traceback.print_exc()
            del pipe
            save()
    if args.baseline and load_format == "auto":  # after the engine has released its memory
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            log(f"GPU memory before the baseline: {torch.cuda.memory_allocated() / 2**30:.1f} GiB")

        def baseline() -> dict:
            if w1_req is None:
                raise RuntimeError("no W1 request was prepared (the engine did not start)")
            pixels = torch.cat([as_pixel_values(im.pixels()) for im in w1_req.images])
            return transformers_w1(model, w1_req.token_ids, pixels)

        stage(res, "transformers_w1", baseline, deadline, save)
    save()
    table = write_outputs(res, args)
    print(table, flush=True)
    failed = [k for k, v in res.items() if isinstance(v, dict) and "error" in v]
    if failed:
        log(f"failed: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
