"""Engine benchmarks W1–W3 of docs/DESIGN §5 and a two-turn chat (InternVL3.5, greedy, no EOS).

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

Images travel as base64 ``data:image/jpeg`` URLs inside OpenAI-style messages, so JPEG decoding,
tiling and normalisation are inside the timed region, as for the reference system's harness. Each
workload runs once after a warm-up of the same shape (chat2's warm-up is a two-turn chat on another
image). A workload that fails records its error and the next one runs; ``--time-limit`` skips the
workloads that would start after it. With ``--baseline`` the transformers reference (``generate``,
SDPA) is measured in the same process for W1-shaped decoding, after the engine has been released.

    python benchmarks/engine.py --model /tmp/ivl8b-hf --baseline --json engine.json \\
        --out docs/benchmarks.md --lmdeploy-note "quoted from ..."
    python benchmarks/engine.py --preset 8b          # config + tokenizer only, dummy weights
    python benchmarks/engine.py --render engine.json --out table.md   # table of saved results
"""

from __future__ import annotations

import argparse
import base64
import datetime
import gc
import io
import json
import math
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlmdeploy import GenerationConfig, PytorchEngineConfig, pipeline
from vlmdeploy.vl.constants import IMAGE_TOKEN
from vlmdeploy.vl.tiling import as_pixel_values

sys.path.insert(0, str(Path(__file__).resolve().parent))  # engine_report.py, beside this script
from engine_report import write_outputs  # noqa: E402

VOCAB = (
    "image picture scene shape colour light dark left right top bottom centre object person "
    "street river table window garden bright small large round square describe detail show "
    "the a of and to in is with on for that this"
).split()
WORKLOADS = ("w1", "chat2", "w2", "w3")  # the order they run in
FIRST_STEPS = 4  # steps of a batch run's ramp reported one by one

_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[engine.py +{time.monotonic() - _T0:6.1f}s] {msg}", flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_ms(fn, *args) -> float:
    """Wall ms of ``fn(*args)``, the GPU's queued work included."""
    sync()
    t = time.perf_counter()
    fn(*args)
    sync()
    return (time.perf_counter() - t) * 1e3


def text_of(tokenizer, n_tokens: int, rng: np.random.Generator) -> str:
    """Random words that tokenize to ``n_tokens`` tokens (approximately, never more)."""
    words: list[str] = []
    while len(tokenizer.encode(" ".join(words))) < n_tokens:
        words.append(VOCAB[rng.integers(len(VOCAB))])
    while len(tokenizer.encode(" ".join(words))) > n_tokens:
        words.pop()
    return " ".join(words)


def jpeg_url(side: int, rng: np.random.Generator) -> str:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(
        buf, "JPEG", quality=75
    )
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def request(url: str, text: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": text},
            ],
        }
    ]


def workload(tok, n: int, side: int, n_text: int, seed: int) -> list[list[dict]]:
    rng = np.random.default_rng(seed)
    return [request(jpeg_url(side, rng), text_of(tok, n_text, rng)) for _ in range(n)]


def gen(n_out: int) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n_out, ignore_eos=True)


def run_w1(pipe, tok, ttft_runs: int = 11) -> dict:
    """TPOT from one 512-token request; TTFT as the median of ``ttft_runs`` requests (that one
    and shorter ones), each with its own image so no cache helps."""
    list(pipe.stream_infer([workload(tok, 1, 448, 30, seed=2)[0]], gen_config=gen(16)))  # warm-up
    sync()
    with GcPauses() as pauses:
        ttfts, parts = [], []
        for i in range(ttft_runs - 1):
            prompt = workload(tok, 1, 448, 30, seed=100 + i)[0]
            pipe.engine.trace = []
            t0 = time.perf_counter()
            for r in pipe.stream_infer([prompt], gen_config=gen(2)):
                if r.token_ids:
                    ttfts.append(time.perf_counter() - t0)
                    break
            sync()
            parts.append(ttft_parts(pipe.engine.trace, t0, ttfts[-1]))
        pipe.engine.trace = None
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


def ttft_parts(trace: list, t0: float, ttft: float) -> dict:
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


def chat_turn(pipe, messages: list[dict], n_out: int) -> dict:
    """One streamed turn: TTFT (submit → first chunk with a token), the answer, cached tokens."""
    pipe.engine.trace = []
    t0, first, parts, cached, n_in, n_gen = time.perf_counter(), None, [], 0, 0, 0
    for r in pipe.stream_infer([messages], gen_config=gen(n_out)):
        if first is None and r.token_ids:
            first = time.perf_counter()
        parts.append(r.text)
        cached, n_in = max(cached, r.cached_tokens), r.input_token_len
        n_gen = max(n_gen, r.generate_token_len)
        if r.error_message:
            raise RuntimeError(f"chat turn failed: {r.error_message}")
    trace, pipe.engine.trace = pipe.engine.trace, None
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
    t1, t2 = two_turn_chat(pipe, tok, seed=40)
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
    prompts = workload(tok, n, side, n_text, seed)
    pipe(workload(tok, 1, side, n_text, seed + 1000), gen_config=gen(n_out))  # warm-up
    sync()
    pipe.engine.trace = []  # the engine thread appends one record per step
    with GcPauses() as pauses:
        t0 = time.perf_counter()
        out = pipe(prompts, gen_config=gen(n_out))
        wall = time.perf_counter() - t0
    trace, pipe.engine.trace = pipe.engine.trace, None
    n_in, n_gen = sum(r.input_token_len for r in out), sum(r.generate_token_len for r in out)
    return {
        "requests": n,
        "wall_s": wall,
        "requests_per_s": n / wall,
        "input_tokens_per_s": n_in / wall,
        "output_tokens_per_s": n_gen / wall,
        "short_outputs": sum(r.generate_token_len != n_out for r in out),
        "timeline": timeline(trace, t0, t0 + wall) | pauses.summary(),
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


def timeline(trace: list, t0: float, t1: float) -> dict:
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


def transformers_w1(model_dir: str, token_ids: list[int], pixels: torch.Tensor) -> dict:
    """transformers' reference on a W1-shaped request: TTFT and TPOT of ``generate`` at batch 1."""
    from transformers import InternVLForConditionalGeneration

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    model = InternVLForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).to(dev).eval()
    ids = torch.tensor([token_ids], device=dev)
    pixels = pixels.to(dev, dtype)

    def timed(n: int) -> float:
        sync()
        t = time.perf_counter()
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=pixels,
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
        )
        sync()
        return time.perf_counter() - t

    timed(4)
    short, long = timed(1), timed(129)
    return {"ttft_ms": short * 1e3, "tpot_ms": (long - short) / 128 * 1e3}


def device_line() -> str:
    if not torch.cuda.is_available():
        return f"CPU; torch {torch.__version__}"
    q = "name,memory.total,driver_version"
    try:
        out = (
            subprocess.run(
                ["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            .stdout.strip()
            .splitlines()
        )
    except (OSError, subprocess.SubprocessError):
        out = []
    name = out[0] if out else torch.cuda.get_device_name()
    return f"{name}; torch {torch.__version__}"


# ---- running -------------------------------------------------------------------------------


def summary_line(name: str, r: dict) -> str:
    if name == "w1":
        return (
            f"TTFT {r['ttft_ms']:.1f} ms (median of {r['ttft_runs']}, {r['ttft_min_ms']:.1f}-"
            f"{r['ttft_max_ms']:.1f}), TPOT {r['tpot_ms']:.2f} ms ({r['output_tokens']} tokens); "
            f"TTFT parts (medians, ms) {r.get('ttft_parts_ms')}"
        )
    if name == "chat2":
        return (
            f"TTFT turn 1 {r['ttft1_ms']:.1f} ms, turn 2 {r['ttft2_ms']:.1f} ms, ratio "
            f"{r['ratio']:.3f}; turn 2 cached {r['cached_tokens']} of {r['turn2_input_tokens']} "
            f"prompt tokens; turn 2 TTFT parts (ms) {r.get('ttft2_parts_ms')}, tiles encoded "
            f"{r.get('turn2_tiles_encoded')}"
        )
    if name in ("w2", "w3"):
        return (
            f"{r['requests']} requests in {r['wall_s']:.1f} s: {r['requests_per_s']:.2f} req/s, "
            f"in {r['input_tokens_per_s']:,.0f} tok/s, out {r['output_tokens_per_s']:,.0f} tok/s"
            + (f" (median run; all runs {r['runs']})" if len(r.get("runs", [])) > 1 else "")
            + (f"; timeline {json.dumps(r['timeline'])}" if r.get("timeline") else "")
        )
    if name == "transformers_w1":
        return f"TTFT {r['ttft_ms']:.1f} ms, TPOT {r['tpot_ms']:.2f} ms"
    return json.dumps(r)


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


def model_source(model: str | None, preset: str | None, load_format: str = "auto"
                 ) -> tuple[str, str]:
    """The checkpoint to load and its load format: ``model`` as given, or for ``preset`` a
    config-and-tokenizer checkpoint of that size (written once under /tmp) with dummy weights."""
    if not preset:
        return model, load_format
    from vlmdeploy.testing.checkpoint import make_checkpoint

    path = make_checkpoint(f"/tmp/vlmdeploy-bench-{preset}", preset, "hf", dtype=torch.bfloat16,
                           weights=False)
    return str(path), "dummy"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint directory")
    ap.add_argument("--preset", help="write config + tokenizer of this size and use dummy weights")
    ap.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="of " + ",".join(WORKLOADS))
    ap.add_argument("--n2", type=int, default=256)
    ap.add_argument("--n3", type=int, default=256)
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
    ap.add_argument("--json", help="write raw results here (rewritten after every workload)")
    ap.add_argument("--out", help="append a markdown section to this file (and an SVG beside it)")
    ap.add_argument("--render", metavar="JSON", help="only write the table of saved results")
    ap.add_argument("--lmdeploy", help="results.json of the reference harness")
    ap.add_argument(
        "--lmdeploy-note",
        help="printed under the table; marks the LMDeploy column as quoted from an earlier run "
        "(without --lmdeploy, the 2026-11-27 numbers of ../shared/anchors/lmdeploy/RESULTS.md)",
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
    model, load_format = model_source(args.model, args.preset, args.load_format)
    cfg = PytorchEngineConfig(
        session_len=args.session_len,
        load_format=load_format,
        enable_prefix_caching=args.prefix_caching,
        cache_max_entry_count=args.cache_max_entry_count,
    )
    now = datetime.datetime.now(datetime.timezone.utc)
    res: dict = {
        "date": now.date().isoformat(),
        "time_utc": now.strftime("%H:%M:%S"),
        "device": device_line(),
        "model": model,
        "load_format": load_format,
        "settings": {
            "session_len": args.session_len,
            "enable_prefix_caching": args.prefix_caching,
            "cache_max_entry_count": args.cache_max_entry_count,
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
            res["kv_tokens"] = pipe.engine.num_blocks * pipe.engine.block_size
            res["startup"] = pipe.engine.startup
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
            }
            for name in WORKLOADS:
                if name in todo:
                    stage(res, name, runs[name], deadline, save)
        finally:
            res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
            res["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0
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
