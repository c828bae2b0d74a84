"""What each quantised format costs in accuracy, on one shape, against bf16 on the same weights.

The same prompts (W1's shape: one 448×448 image and ~30 text tokens each) run one at a time,
greedy, for ``--tokens`` tokens, in bf16 and then in each format:

* **teacher-forced**: every step is fed bf16's token, so each step's logits meet bf16's at the
  same context: their cosine similarity (mean and minimum over all steps of all prompts) and how
  often the two argmaxes agree;
* **free**: the format's own greedy tokens against bf16's: the share of positions that agree and
  the first position where they part.

Formats are ``bf16``, ``kv8`` / ``kv4`` / ``kv16`` (``quant_policy`` 8, 4, 16), ``fp8``
(``model_format='fp8'``), ``awq`` (the checkpoint made AWQ, rounded to nearest) and joins such as
``fp8+kv8``. With ``--preset`` the weights are the seeded dummy weights, which are one model in
every format (the quantised layers hold bf16's weights rounded), so nothing is read from disk. The
logits come from the engine's own path (CUDA graphs, kernels), read at its sampler.

On random weights the logits are nearly flat, so greedy agreement is a harsh test (near-ties flip
and the texts then part for good); the cosine is the number to read.

    python -m benchmarks.quant_accuracy --preset 8b [--formats bf16,kv8,...] [--tokens 256]
        [--prompts 4] [--json acc.json] [--csv results.csv]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import time
from pathlib import Path

import torch

import vlmdeploy.engine.llm_engine as llm_engine
from benchmarks import results
from benchmarks.results import current_commit, device_line
from benchmarks.workloads import model_source, shape_name, workload
from vlmdeploy import GenerationConfig, PytorchEngineConfig, pipeline
from vlmdeploy.engine.sampling import SampleResult

FORMATS = {"bf16": (None, 0), "kv8": (None, 8), "kv4": (None, 4), "kv16": (None, 16),
           "fp8": ("fp8", 0), "awq": ("awq", 0)}
DEFAULT_FORMATS = "bf16,kv8,kv4,kv16,fp8,awq,fp8+kv8"


def settings(fmt: str) -> tuple[str | None, int]:
    """``'fp8+kv8'`` → (model_format, quant_policy)."""
    model_format, policy = None, 0
    for part in fmt.split("+"):
        if part not in FORMATS:
            raise ValueError(f"unknown format {part!r}; known: {', '.join(FORMATS)}")
        mf, qp = FORMATS[part]
        model_format, policy = mf or model_format, qp or policy
    return model_format, policy


class Tap:
    """Stands in for the engine's sampler: records each step's logits row (one request at a
    time), compares it with the reference's and, when forcing, feeds the reference's token."""

    def __init__(self, sample_async):
        self.sample_async = sample_async
        self.reset()

    def reset(self, reference: list[torch.Tensor] | None = None,
              tokens: list[int] | None = None, record: bool = False) -> None:
        self.reference, self.force, self.record = reference, tokens, record
        self.step = 0
        self.rows: list[torch.Tensor] = []
        self.cos: list[torch.Tensor] = []
        self.top1: list[torch.Tensor] = []

    def __call__(self, logits, params, histories, num_outputs, masks=None):
        result = self.sample_async(logits, params, histories, num_outputs, masks)
        if not (self.record or self.reference is not None or self.force is not None):
            return result  # between measurements (the engine's own warm-up, say)
        if logits.shape[0] != 1:
            raise RuntimeError("quant_accuracy runs one request at a time")
        step, self.step = self.step, self.step + 1
        row = logits[0].float()
        if self.record:
            self.rows.append(row.clone())  # on the device; copied before the next step runs
        if self.reference is not None and step < len(self.reference):
            ref = self.reference[step]
            self.cos.append(torch.nn.functional.cosine_similarity(row, ref, dim=0))
            self.top1.append(row.argmax() == ref.argmax())
        if self.force is not None and step < len(self.force):
            forced = torch.full_like(result.tokens, self.force[step])
            return SampleResult(forced, logits=logits)
        return result


def generate(pipe, prompt, tokens: int) -> list[int]:
    out = pipe([prompt], gen_config=GenerationConfig(max_new_tokens=tokens, ignore_eos=True))[0]
    if out.error_message:
        raise RuntimeError(out.error_message)
    return list(out.token_ids)


def run_format(fmt: str, args, tap: Tap, prompts, reference: dict | None) -> dict:
    model_format, policy = settings(fmt)
    model, load_format = model_source(args.model, args.preset, args.load_format, model_format)
    cfg = PytorchEngineConfig(session_len=4096, load_format=load_format,
                              model_format=model_format, quant_policy=policy,
                              cache_max_entry_count=args.cache_max_entry_count)
    t = time.perf_counter()
    pipe = pipeline(model, backend_config=cfg)
    out: dict = {"model_format": model_format, "quant_policy": policy,
                 "init_s": round(time.perf_counter() - t, 1),
                 "kv_tokens": pipe.engine.core.num_blocks * pipe.engine.core.cfg.block_size}
    try:
        if reference is None:  # bf16: the logits and tokens the others are held to
            ref = {"rows": [], "tokens": []}
            for p in prompts:
                tap.reset(record=True)
                ref["tokens"].append(generate(pipe, p, args.tokens))
                ref["rows"].append(tap.rows)
            out["reference"] = ref
            return out
        cos, top1, agree, first = [], [], [], []
        for i, p in enumerate(prompts):
            rows, want = reference["rows"][i], reference["tokens"][i]
            tap.reset(rows, want)
            generate(pipe, p, args.tokens)  # teacher-forced on bf16's tokens
            cos += [c.item() for c in tap.cos]
            top1 += [bool(b) for b in tap.top1]
            tap.reset()
            got = generate(pipe, p, args.tokens)
            same = [a == b for a, b in zip(got, want)]
            agree.append(sum(same) / len(want))
            first.append(same.index(False) if False in same else len(want))
        out |= {"cosine_mean": sum(cos) / len(cos), "cosine_min": min(cos),
                "top1_agreement": sum(top1) / len(top1), "steps": len(cos),
                "greedy_agreement": sum(agree) / len(agree), "first_difference": first}
        return out
    finally:
        tap.reset()
        pipe.close()
        del pipe
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def table(res: dict) -> str:
    lines = [f"Accuracy against bf16 on the same weights, {res['model_shape']}, {res['prompts']} "
             f"prompts x {res['tokens']} tokens; {res['device']}; {res['date']}, commit "
             f"{res['commit'] or '?'}", "",
             "| format | KV tokens | cosine mean | cosine min | argmax agree (forced) | "
             "greedy agree | first difference |", "|---|---|---|---|---|---|---|"]
    for fmt, r in res["formats"].items():
        if "error" in r:
            lines.append(f"| {fmt} | error: {r['error'][:120]} | | | | | |")
        elif fmt == "bf16":
            lines.append(f"| bf16 | {r['kv_tokens']:,} | 1 (reference) | | | | |")
        else:
            lines.append(f"| {fmt} | {r['kv_tokens']:,} | {r['cosine_mean']:.5f} | "
                         f"{r['cosine_min']:.5f} | {r['top1_agreement']:.1%} | "
                         f"{r['greedy_agreement']:.1%} | {r['first_difference']} |")
    return "\n".join(lines)


def history_rows(res: dict) -> list[dict[str, str]]:
    st = results.Stamp(res["date"], res["time_utc"], res["commit"], res["device"])
    note = f"{res['prompts']} prompts x {res['tokens']} tokens, against bf16 on the same weights"
    out = []
    for fmt, r in res["formats"].items():
        if fmt == "bf16" or "error" in r:
            continue
        system = f"vlmdeploy {fmt}"
        for metric, unit in (("cosine_mean", ""), ("cosine_min", ""),
                             ("top1_agreement", "share"), ("greedy_agreement", "share")):
            out.append(results.row(st, res["model_shape"], "accuracy", metric, system,
                                   round(r[metric], 6), unit, note))
        out.append(results.row(st, res["model_shape"], "engine", "kv_cache_tokens", system,
                               r["kv_tokens"], "tokens", "cache_max_entry_count "
                               f"{res['cache_max_entry_count']}"))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint directory (bf16)")
    ap.add_argument("--preset", help="config + tokenizer of this size, dummy weights")
    ap.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    ap.add_argument("--formats", default=DEFAULT_FORMATS)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--cache-max-entry-count", type=float, default=0.8)
    ap.add_argument("--model-shape")
    ap.add_argument("--json")
    ap.add_argument("--csv")
    args = ap.parse_args(argv)
    if not (args.model or args.preset):
        ap.error("one of --model, --preset is needed")
    formats = [f for f in args.formats.split(",") if f]
    for f in formats:
        settings(f)  # unknown names fail before anything loads
    if "bf16" in formats:
        formats.remove("bf16")
    now = datetime.datetime.now(datetime.timezone.utc)
    res: dict = {"date": now.date().isoformat(), "time_utc": now.strftime("%H:%M:%S"),
                 "commit": current_commit(), "device": device_line(),
                 "model_shape": args.model_shape or (shape_name(args.preset) if args.preset
                                                     else Path(args.model).name),
                 "tokens": args.tokens, "prompts": args.prompts,
                 "cache_max_entry_count": args.cache_max_entry_count, "formats": {}}
    tap = Tap(llm_engine.sample_async)
    llm_engine.sample_async = tap
    try:
        from transformers import AutoTokenizer

        model, _ = model_source(args.model, args.preset, args.load_format)
        tok = AutoTokenizer.from_pretrained(model)
        prompts = workload(tok, args.prompts, 448, 30, seed=7)
        bf16 = run_format("bf16", args, tap, prompts, None)
        reference = bf16.pop("reference")
        res["formats"]["bf16"] = bf16
        for fmt in formats:
            try:
                res["formats"][fmt] = run_format(fmt, args, tap, prompts, reference)
            except Exception as exc:  # one format's failure is its row, not the run's end
                res["formats"][fmt] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"{fmt}: {json.dumps(res['formats'][fmt])[:300]}", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(res, indent=1))
    finally:
        llm_engine.sample_async = tap.sample_async
    print(table(res), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    if args.csv:
        results.append(args.csv, history_rows(res))
    return res


if __name__ == "__main__":
    main()
