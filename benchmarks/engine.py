"""Engine benchmarks W1–W3 of docs/DESIGN §5 (InternVL3.5 architecture, greedy, ``ignore_eos``).

* W1 latency: 1 request, one 448×448 image + ~30 text tokens, 512 output tokens, through
  ``stream_infer`` → TTFT and mean TPOT (and the weight bandwidth that TPOT implies).
* W2 image-heavy: N requests, each a distinct 1024×1024 JPEG (10 tiles, 2,560 image tokens) + ~100
  text tokens, 100 output tokens, through ``infer`` → requests/s, input and output tokens/s.
* W3 decode-heavy: N requests, each a distinct 448×448 JPEG + ~30 text tokens, 512 output tokens →
  output tokens/s.

Images travel as base64 ``data:image/jpeg`` URLs inside OpenAI-style messages, so JPEG decoding,
tiling and normalisation are inside the timed region, as for the reference system's harness. Each
workload runs once after a warm-up request of the same shape. With ``--baseline`` the transformers
reference (``generate``, SDPA) is measured in the same process for W1-shaped decoding.

    python benchmarks/engine.py --model /tmp/ivl35-8b [--load-format dummy] [--out
    docs/benchmarks.md] python benchmarks/engine.py --preset 8b          # writes config +
    tokenizer, dummy weights
"""

from __future__ import annotations

import argparse
import base64
import datetime
import io
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlmdeploy import GenerationConfig, PytorchEngineConfig, pipeline

VOCAB = (
    "image picture scene shape colour light dark left right top bottom centre object person "
    "street river table window garden bright small large round square describe detail show "
    "the a of and to in is with on for that this"
).split()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


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


def run_w1(pipe, tok) -> dict:
    prompt = workload(tok, 1, 448, 30, seed=1)[0]
    list(pipe.stream_infer([workload(tok, 1, 448, 30, seed=2)[0]], gen_config=gen(16)))  # warm-up
    sync()
    stamps, t0 = [], time.perf_counter()
    for r in pipe.stream_infer([prompt], gen_config=gen(512)):
        stamps.append((time.perf_counter(), len(r.token_ids)))
    first = next(t for t, n in stamps if n)
    n_out = sum(n for _, n in stamps)
    tpot = (stamps[-1][0] - first) / max(1, n_out - 1)
    return {"ttft_ms": (first - t0) * 1e3, "tpot_ms": tpot * 1e3, "output_tokens": n_out}


def run_batch(pipe, tok, n: int, side: int, n_text: int, n_out: int, seed: int) -> dict:
    prompts = workload(tok, n, side, n_text, seed)
    pipe(workload(tok, 1, side, n_text, seed + 1000), gen_config=gen(n_out))  # warm-up
    sync()
    t0 = time.perf_counter()
    out = pipe(prompts, gen_config=gen(n_out))
    wall = time.perf_counter() - t0
    n_in, n_gen = sum(r.input_token_len for r in out), sum(r.generate_token_len for r in out)
    return {
        "requests": n,
        "wall_s": wall,
        "requests_per_s": n / wall,
        "input_tokens_per_s": n_in / wall,
        "output_tokens_per_s": n_gen / wall,
    }


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
        return "CPU"
    q = "name,memory.total,driver_version"
    out = (
        subprocess.run(
            ["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
        .stdout.strip()
        .splitlines()
    )
    return f"{out[0]}; torch {torch.__version__}" if out else torch.cuda.get_device_name()


def comparison(
    res: dict, lmdeploy: dict | None
) -> list[tuple[str, float, float | None, float | None]]:
    """(metric, vlmdeploy, LMDeploy, transformers) rows; None where a system was not measured."""
    lm, tf = lmdeploy or {}, res.get("transformers_w1", {})
    rows = []
    if "w1" in res:
        lw1 = lm.get("w1", {})
        rows += [
            ("W1 TTFT ms", res["w1"]["ttft_ms"], lw1.get("ttft_ms"), tf.get("ttft_ms")),
            ("W1 TPOT ms", res["w1"]["tpot_ms"], lw1.get("tpot_ms"), tf.get("tpot_ms")),
        ]
    if "w2" in res:
        rows.append(
            ("W2 requests/s", res["w2"]["requests_per_s"], lm.get("w2", {}).get("req_per_s"), None)
        )
    if "w3" in res:
        rows.append(
            (
                "W3 output tokens/s",
                res["w3"]["output_tokens_per_s"],
                lm.get("w3", {}).get("output_tok_per_s"),
                None,
            )
        )
    return rows


def markdown(res: dict, lmdeploy: dict | None = None, plot: str | None = None) -> str:
    def cell(v: float | None) -> str:
        return "–" if v is None else f"{v:,.2f}" if v < 100 else f"{v:,.0f}"

    lines = [
        f"### {res['date']} — {res['device']}",
        "",
        f"Model: {res['model']} (load format {res['load_format']}); KV cache "
        f"{res['kv_tokens']:,} tokens; peak GPU memory {res['peak_gib']:.1f} GiB. LMDeploy and "
        "transformers columns come from the same device call.",
        "",
        "| metric | vlmdeploy | LMDeploy | transformers |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {m} | {cell(a)} | {cell(b)} | {cell(c)} |" for m, a, b, c in comparison(res, lmdeploy)
    ]
    if plot:
        lines += ["", f"![vlmdeploy against the baselines]({plot})"]
    return "\n".join(lines) + "\n"


def svg_plot(res: dict, lmdeploy: dict | None) -> str:
    """Bars of each metric relative to LMDeploy (higher is better; latencies inverted)."""
    rows = [(m, a, b) for m, a, b, _ in comparison(res, lmdeploy) if b]
    width, bar, gap = 640, 18, 14
    height = 40 + len(rows) * (2 * bar + gap)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="12">',
        '<text x="10" y="20">speed relative to LMDeploy (1.0 = equal; latency inverted)</text>',
    ]
    scale = (width - 220) / max([2.0] + [(b / a if "ms" in m else a / b) for m, a, b in rows])
    y = 40
    for m, a, b in rows:
        ratio = b / a if "ms" in m else a / b
        out += [
            f'<text x="10" y="{y + bar - 4}">{m}</text>',
            f'<rect x="180" y="{y}" width="{ratio * scale:.1f}" height="{bar}" fill="#2b6cb0"/>',
            f'<text x="{186 + ratio * scale:.1f}" y="{y + bar - 4}">vlmdeploy {ratio:.2f}x</text>',
            f'<rect x="180" y="{y + bar}" width="{scale:.1f}" height="{bar}" fill="#a0aec0"/>',
            f'<text x="{186 + scale:.1f}" y="{y + 2 * bar - 4}">LMDeploy 1.00x</text>',
        ]
        y += 2 * bar + gap
    return "\n".join(out + ["</svg>"]) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint directory")
    ap.add_argument("--preset", help="write config + tokenizer of this size and use dummy weights")
    ap.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    ap.add_argument("--workloads", default="w1,w2,w3")
    ap.add_argument("--n2", type=int, default=256)
    ap.add_argument("--n3", type=int, default=256)
    ap.add_argument("--session-len", type=int, default=8192)
    ap.add_argument("--baseline", action="store_true", help="also time transformers on W1")
    ap.add_argument("--json", help="write raw results here")
    ap.add_argument("--out", help="append a markdown section to this file (and an SVG beside it)")
    ap.add_argument("--lmdeploy", help="results.json of the reference harness, same device call")
    args = ap.parse_args(argv)
    model, load_format = args.model, args.load_format
    if args.preset:
        from vlmdeploy.testing.checkpoint import make_checkpoint

        model = str(
            make_checkpoint(
                f"/tmp/vlmdeploy-bench-{args.preset}",
                args.preset,
                "hf",
                dtype=torch.bfloat16,
                weights=False,
            )
        )
        load_format = "dummy"
    cfg = PytorchEngineConfig(session_len=args.session_len, load_format=load_format)
    res = {
        "date": datetime.date.today().isoformat(),
        "device": device_line(),
        "model": model,
        "load_format": load_format,
    }
    todo = set(args.workloads.split(","))
    cuda = torch.cuda.is_available()
    with pipeline(model, backend_config=cfg) as pipe:
        tok = pipe.tokenizer
        res["kv_tokens"] = pipe.engine.num_blocks * pipe.engine.block_size
        w1_req = pipe.prepare_sync(workload(tok, 1, 448, 30, seed=1)[0], gen(1))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        if "w1" in todo:
            res["w1"] = run_w1(pipe, tok)
        if "w2" in todo:
            res["w2"] = run_batch(pipe, tok, args.n2, 1024, 100, 100, seed=20)
        if "w3" in todo:
            res["w3"] = run_batch(pipe, tok, args.n3, 448, 30, 512, seed=30)
        res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    if args.baseline and load_format == "auto":  # after the engine has released its memory
        pixels = torch.cat([im.pixel_values for im in w1_req.images])
        res["transformers_w1"] = transformers_w1(model, w1_req.token_ids, pixels)
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    if args.out:
        lmdeploy = json.loads(Path(args.lmdeploy).read_text()) if args.lmdeploy else None
        plot = None
        if lmdeploy:
            plot = f"benchmarks-{res['date']}.svg"
            (Path(args.out).parent / plot).write_text(svg_plot(res, lmdeploy))
        with open(args.out, "a") as f:
            f.write("\n" + markdown(res, lmdeploy, plot))


if __name__ == "__main__":
    main()
