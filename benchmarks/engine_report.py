"""The engine benchmark's report: the results table beside the targets, LMDeploy and transformers
(for the reader of a run), and the run's rows for the results history (``benchmarks/results.py``).
Used by ``benchmarks/engine.py``, also to redo both from saved results."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from benchmarks import results

# LMDeploy 0.18.0's PyTorch engine on the same workloads and card type (one H100 80GB HBM3), from
# its own harness: ../shared/anchors/lmdeploy/RESULTS.md (medians; torch's peak memory counters).
# Shown only when LMDeploy did not run in the call, labelled as quoted, never written to the
# history as a same-call baseline.
LMDEPLOY_QUOTED = {
    "label": "LMDeploy 0.18 (quoted, not this call)",
    "w1": {"ttft_ms": 112.0, "tpot_ms": 6.69},
    "w2": {"req_per_s": 7.81},
    "w3": {"output_tok_per_s": 9317.0},
    "kv_tokens": 347_648,
    "peak_gib": 66_226 / 1024,
    "peak_reserved_gib": 68_248 / 1024,
}
LMDEPLOY = "lmdeploy-0.18"  # its system name in the history
# The absolute targets on one H100, (direction, bound) per metric, for the runs that have them: the
# InternVL3.5-8B shape in bf16, and with model_format='fp8' and quant_policy=8 (keyed by
# quant_suffix). Other shapes and formats are held to LMDeploy's numbers from the same call
# (RELATIVE_TARGETS); the chat2 ratio holds everywhere.
TARGETS: dict[tuple[str, str], dict[str, tuple[str, float]]] = {
    ("InternVL3.5-8B", ""): {
        "W1 TTFT ms": ("<=", 30.0),
        "W1 TPOT ms": ("<=", 5.6),
        "W2 requests/s": (">=", 11.0),
        "W3 output tokens/s": (">=", 14_000.0),
        "KV cache tokens": (">=", 340_000.0),
    },
    ("InternVL3.5-8B", " fp8+kv8"): {
        "W1 TPOT ms": ("<=", 3.2),
        "W2 requests/s": (">=", 13.0),
        "W3 output tokens/s": (">=", 18_000.0),
    },
}
ANY_SHAPE_TARGETS: dict[str, tuple[str, float]] = {
    "chat2 TTFT turn 2 / turn 1": ("<", 0.30),
    "W1 TPOT / weight-read floor": ("<=", 1.4),  # benchmarks.decode_floor
    # constrained requests mixed in cost the others at most 5% (every request is 512 tokens, so
    # the batch's throughput ratio is the unconstrained requests' own)
    "W3s / W3 output tokens/s": (">=", 0.95),
}
# (direction, factor × LMDeploy's value in the same call)
RELATIVE_TARGETS: dict[str, tuple[str, float]] = {
    "W1 TPOT ms": ("<=", 0.85),
    "W2 requests/s": (">=", 1.3),
    "W3 output tokens/s": (">=", 1.3),
}
# table metric -> (workload, metric, unit) in the history
HISTORY_NAMES: dict[str, tuple[str, str, str]] = {
    "W1 TTFT ms": ("W1", "ttft_ms", "ms"),
    "W1 TPOT ms": ("W1", "tpot_ms", "ms"),
    "W1 TPOT / weight-read floor": ("W1", "tpot_over_floor", "ratio"),
    "W2 requests/s": ("W2", "requests_per_s", "req/s"),
    "W3 output tokens/s": ("W3", "output_tokens_per_s", "tok/s"),
    "W3s output tokens/s": ("W3s", "output_tokens_per_s", "tok/s"),
    "W3s / W3 output tokens/s": ("W3s", "over_w3", "ratio"),
    "chat2 TTFT turn 1 ms": ("chat2", "ttft_turn1_ms", "ms"),
    "chat2 TTFT turn 2 ms": ("chat2", "ttft_turn2_ms", "ms"),
    "chat2 TTFT turn 2 / turn 1": ("chat2", "ttft_ratio", "turn 2 / turn 1"),
    "chat2 turn-2 cached tokens": ("chat2", "cached_tokens", "tokens"),
    "KV cache tokens": ("engine", "kv_cache_tokens", "tokens"),
    "peak GPU memory allocated GiB": ("engine", "peak_allocated_gib", "GiB"),
    "peak GPU memory reserved GiB": ("engine", "peak_reserved_gib", "GiB"),
}


# ---- results → table -----------------------------------------------------------------------


def _get(d: dict | None, *keys: str) -> float | None:
    """The first of ``keys`` (dotted paths) that ``d`` holds as a number."""
    for key in keys:
        v: object = d or {}
        for part in key.split("."):
            v = v.get(part) if isinstance(v, dict) else None
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


def lmdeploy_values(lm: dict | None) -> dict[str, float | None]:
    """LMDeploy's numbers from its harness's results.json (or ``LMDEPLOY_QUOTED``)."""
    cfg = (lm or {}).get("engine_config", {}) if isinstance(lm, dict) else {}
    kv = _get(lm, "kv_tokens")
    if kv is None and _get(cfg, "num_gpu_blocks") and _get(cfg, "block_size"):
        kv = _get(cfg, "num_gpu_blocks") * _get(cfg, "block_size")
    mib = lambda k: None if _get(lm, k) is None else _get(lm, k) / 1024
    return {
        "W1 TTFT ms": _get(lm, "w1.ttft_ms_median_of_runs", "w1.ttft_ms"),
        "W1 TPOT ms": _get(lm, "w1.tpot_ms_median_of_runs", "w1.tpot_ms"),
        "W2 requests/s": _get(lm, "w2.req_per_s", "w2.requests_per_s"),
        "W3 output tokens/s": _get(lm, "w3.output_tok_per_s", "w3.output_tokens_per_s"),
        "KV cache tokens": kv,
        "peak GPU memory allocated GiB": _get(lm, "peak_gib")
        or mib("torch_max_memory_allocated_mib"),
        "peak GPU memory reserved GiB": _get(lm, "peak_reserved_gib")
        or mib("torch_max_memory_reserved_mib"),
    }


def comparison(res: dict, lmdeploy: dict | None) -> list[tuple[str, object, object, object]]:
    """(metric, vlmdeploy, LMDeploy, transformers) rows. A value is a number, None where a system
    was not measured, or a string ("error", "skipped") where it failed."""
    lm, tf = lmdeploy_values(lmdeploy), res.get("transformers_w1") or {}

    def ours(workload: str, key: str) -> object:
        r = res.get(workload)
        if not isinstance(r, dict):
            return None
        if "error" in r:
            return "error"
        if "skipped" in r:
            return "skipped"
        return r.get(key)

    def theirs(key: str) -> object:
        return "error" if "error" in tf else "skipped" if "skipped" in tf else tf.get(key)

    w3, w3s = ours("w3", "output_tokens_per_s"), ours("w3s", "output_tokens_per_s")
    w3s_ratio = w3s / w3 if _is_num(w3s) and _is_num(w3) and w3 else None
    return [
        ("W1 TTFT ms", ours("w1", "ttft_ms"), lm["W1 TTFT ms"], theirs("ttft_ms")),
        ("W1 TPOT ms", ours("w1", "tpot_ms"), lm["W1 TPOT ms"], theirs("tpot_ms")),
        ("W1 TPOT / weight-read floor", ours("w1", "tpot_over_floor"), None, None),
        ("W2 requests/s", ours("w2", "requests_per_s"), lm["W2 requests/s"], None),
        ("W3 output tokens/s", w3, lm["W3 output tokens/s"], None),
        ("W3s output tokens/s", w3s, None, None),
        ("W3s / W3 output tokens/s", w3s_ratio, None, None),
        ("chat2 TTFT turn 1 ms", ours("chat2", "ttft1_ms"), None, None),
        ("chat2 TTFT turn 2 ms", ours("chat2", "ttft2_ms"), None, None),
        ("chat2 TTFT turn 2 / turn 1", ours("chat2", "ratio"), None, None),
        ("chat2 turn-2 cached tokens", ours("chat2", "cached_tokens"), None, None),
        ("KV cache tokens", res.get("kv_tokens"), lm["KV cache tokens"], None),
        ("peak GPU memory allocated GiB", res.get("peak_gib"),
         lm["peak GPU memory allocated GiB"], None),
        ("peak GPU memory reserved GiB", res.get("peak_reserved_gib"),
         lm["peak GPU memory reserved GiB"], None),
    ]


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def targets_for(res: dict) -> dict[str, tuple[str, float]]:
    """The absolute targets of this run's shape and formats (only the chat2 ratio for others)."""
    key = (res.get("model_shape") or "", quant_suffix(res.get("settings", {})))
    return {**TARGETS.get(key, {}), **ANY_SHAPE_TARGETS}


def _met(op: str, value: float, bound: float) -> str:
    return "yes" if {"<=": value <= bound, "<": value < bound, ">=": value >= bound}[op] else "no"


def _op(op: str) -> str:
    return op.replace("<=", "≤").replace(">=", "≥")


def target_cell(metric: str, value: object, targets: dict[str, tuple[str, float]],
                lmdeploy_value: object = None) -> tuple[str, str]:
    """(target, met) for one row: the absolute target where ``targets`` has one, else the
    relative one against ``lmdeploy_value`` (LMDeploy's number from the same call) where given."""
    if metric in targets:
        op, bound = targets[metric]
        text = f"{_op(op)} {bound:,g}"
    elif metric in RELATIVE_TARGETS and lmdeploy_value is not None:
        op, factor = RELATIVE_TARGETS[metric]
        text = f"{_op(op)} {factor:g}× LMDeploy"
        if not _is_num(lmdeploy_value):
            return text, "–"
        bound = factor * lmdeploy_value
    else:
        return "", ""
    if not _is_num(value):
        return text, "–"
    return text, _met(op, value, bound)


def cell(v: object) -> str:
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    if isinstance(v, float) and not math.isfinite(v):
        return "–"
    return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"


def lmdeploy_label(lmdeploy: dict | None, note: str | None, label: str | None = None) -> str:
    if label:
        return label
    if note:
        return (lmdeploy or {}).get("label") or "LMDeploy (quoted, not this call)"
    return "LMDeploy (this call)" if lmdeploy else "LMDeploy"


def markdown(
    res: dict,
    lmdeploy: dict | None = None,
    note: str | None = None,
    label: str | None = None,
) -> str:
    s = res.get("settings", {})
    lm_label = lmdeploy_label(lmdeploy, note, label)
    peak = (
        f"{res['peak_gib']:.1f} GiB allocated / {res.get('peak_reserved_gib', 0.0):.1f} GiB "
        "reserved (torch)"
        if _is_num(res.get("peak_gib"))
        else "–"
    )
    kv = f"{res['kv_tokens']:,}" if _is_num(res.get("kv_tokens")) else "–"
    lm_where = (
        "the LMDeploy column comes from the same device call"
        if lmdeploy and not note
        else "the LMDeploy column is quoted (see the note below)"
        if lmdeploy
        else "LMDeploy was not measured"
    )
    tf_where = (
        "The transformers column was measured in the same call"
        if res.get("transformers_w1")
        else "transformers was not measured"
    )
    lines = [
        f"## Engine benchmark, {res.get('date', '?')} {res.get('time_utc', '')} UTC, commit "
        f"{res.get('commit') or 'unknown'}",
        "",
        f"Device: {res.get('device', '?')}. Model: {res.get('model')} "
        f"({res.get('model_shape') or 'shape not given'}, load format {res.get('load_format')}). "
        f"Settings: session_len {s.get('session_len')}, prefix caching "
        f"{'on' if s.get('enable_prefix_caching') else 'off'}, cache_max_entry_count "
        f"{s.get('cache_max_entry_count')}, W2 {s.get('n2')} / W3 {s.get('n3')} requests; "
        f"engine start {cell(res.get('init_s'))} s. KV cache {kv} tokens; peak GPU memory {peak}. "
        f"{tf_where}; {lm_where}.",
        "",
        f"| metric | vlmdeploy | target | met | {lm_label} | transformers |",
        "|---|---:|---:|:-:|---:|---:|",
    ]
    targets = targets_for(res)
    same_call = bool(lmdeploy) and not note
    for m, a, b, c in comparison(res, lmdeploy):
        t, ok = target_cell(m, a, targets, b if same_call else None)
        lines.append(f"| {m} | {cell(a)} | {t} | {ok} | {cell(b)} | {cell(c)} |")
    runs = [f"{name.upper()} runs in a row: {_runs_note(res[name])} "
            f"({'requests/s' if name == 'w2' else 'output tokens/s'}; the median is in the table)"
            for name in ("w2", "w3") if _runs_note(res.get(name))]
    if _ttft_note(res.get("w1")):
        runs.append(f"W1 TTFT: {_ttft_note(res['w1'])} ms, each request with its own image")
    if _floor_note(res.get("w1")):
        runs.append(f"W1 TPOT floor: {_floor_note(res['w1'])}")
    if runs:
        lines += [""] + [f"- {r}" for r in runs]
    if note:
        lines += ["", f"LMDeploy column: {note}"]
    errors = [
        (k, v.get("error") or v.get("skipped"))
        for k, v in res.items()
        if isinstance(v, dict) and ("error" in v or "skipped" in v)
    ]
    if errors:
        lines += [""] + [f"- {k}: {msg}" for k, msg in errors]
    return "\n".join(lines) + "\n"


def _runs_note(r: object) -> str:
    runs = r.get("runs", []) if isinstance(r, dict) else []
    return ", ".join(f"{x:,}" for x in runs) if len(runs) > 1 else ""


def _ttft_note(w1: object) -> str:
    if not isinstance(w1, dict) or "ttft_runs" not in w1:
        return ""
    return f"median of {w1['ttft_runs']}, {w1['ttft_min_ms']:.1f}–{w1['ttft_max_ms']:.1f}"


def _floor_note(w1: object) -> str:
    if not isinstance(w1, dict) or "tpot_floor_ms" not in w1:
        return ""
    return (f"{w1['decode_weight_gb']:.2f} GB of weights read per batch-1 decode step at "
            f"{w1['copy_gb_s']:,.0f} GB/s (a copy's read + write, measured in this run) = "
            f"{w1['tpot_floor_ms']:.2f} ms")


def quant_suffix(settings: dict) -> str:
    """" fp8+kv8" for a run with quantised weights or KV cache (its system name in the history
    is then "vlmdeploy fp8+kv8", as benchmarks.quant_accuracy names the formats); "" for none."""
    parts = [settings["model_format"]] if settings.get("model_format") not in (None, "hf") else []
    if settings.get("quant_policy"):
        parts.append(f"kv{settings['quant_policy']}")
    return " " + "+".join(parts) if parts else ""


def history_rows(res: dict, lmdeploy_same_call: dict | None = None) -> list[dict[str, str]]:
    """The run's rows for the results history: every number vlmdeploy and transformers measured,
    and LMDeploy's when it ran in the same call (a quoted baseline is already in the history)."""
    st = results.Stamp(res.get("date", ""), res.get("time_utc", ""), res.get("commit", ""),
                       res.get("device", ""))
    shape = res.get("model_shape", "")
    s = res.get("settings", {})
    settings = [f"load format {res['load_format']}" if res.get("load_format") == "dummy" else "",
                "prefix caching off" if s.get("enable_prefix_caching") is False else "",
                f"model_format {s['model_format']}" if s.get("model_format") else "",
                f"quant_policy {s['quant_policy']}" if s.get("quant_policy") else "",
                f"W2 {s['n2']} / W3 {s['n3']} requests" if (s.get("n2"), s.get("n3")) not in
                ((256, 256), (None, None)) else ""]
    run_note = "; ".join(x for x in settings if x)
    runs = {m: _runs_note(res.get(w)) for m, w in (("W2 requests/s", "w2"),
                                                    ("W3 output tokens/s", "w3"))}
    notes = {m: f"runs {r}" for m, r in runs.items() if r}
    notes["W1 TTFT ms"] = _ttft_note(res.get("w1"))
    out = []

    def add(metric: str, value: object, system: str, note: str = "") -> None:
        if _is_num(value):
            workload, name, unit = HISTORY_NAMES[metric]
            text = "; ".join(x for x in (note, run_note) if x)
            out.append(results.row(st, shape, workload, name, system, value, unit, text))

    system = "vlmdeploy" + quant_suffix(s)
    for m, ours, lm, tf in comparison(res, lmdeploy_same_call):
        add(m, ours, system, notes.get(m, ""))
        add(m, lm, LMDEPLOY, "same call")
        add(m, tf, "transformers", "same call, generate with SDPA, batch 1")
    if _is_num(res.get("init_s")):
        out.append(results.row(st, shape, "engine", "start_s", system, res["init_s"], "s",
                               run_note))
    return out


def write_outputs(res: dict, args: argparse.Namespace) -> str:
    """The table (to ``args.out`` when given) and the run's history rows (appended to
    ``args.csv`` when given); returns the table."""
    if args.lmdeploy:
        lmdeploy = json.loads(Path(args.lmdeploy).read_text())
    else:
        lmdeploy = LMDEPLOY_QUOTED if args.lmdeploy_note else None
    text = markdown(res, lmdeploy, args.lmdeploy_note, args.lmdeploy_label)
    if args.out:
        Path(args.out).write_text(text)
    if args.csv:
        same_call = lmdeploy if args.lmdeploy and not args.lmdeploy_note else None
        results.append(args.csv, history_rows(res, same_call))
    return text


def summary_line(name: str, r: dict) -> str:
    """One workload's result as a line of the run's log."""
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
    if name in ("w2", "w3", "w3s", "w4"):
        return (
            f"{r['requests']} requests in {r['wall_s']:.1f} s: {r['requests_per_s']:.2f} req/s, "
            f"in {r['input_tokens_per_s']:,.0f} tok/s, out {r['output_tokens_per_s']:,.0f} tok/s"
            + (f" (median run; all runs {r['runs']})" if len(r.get("runs", [])) > 1 else "")
            + (f"; timeline {json.dumps(r['timeline'])}" if r.get("timeline") else "")
        )
    if name == "transformers_w1":
        return f"TTFT {r['ttft_ms']:.1f} ms, TPOT {r['tpot_ms']:.2f} ms"
    return json.dumps(r)
