"""The engine benchmark's report: the results table beside the issue's targets, LMDeploy and
transformers, and an SVG plot (used by ``benchmarks/engine.py``, also to redraw saved results)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

# LMDeploy 0.18.0's PyTorch engine on the same workloads and card type (one H100 80GB HBM3),
# 2026-11-27: ../shared/anchors/lmdeploy/RESULTS.md (medians; torch's peak memory counters).
LMDEPLOY_QUOTED = {
    "label": "LMDeploy 0.18 (quoted, not this call)",
    "w1": {"ttft_ms": 112.0, "tpot_ms": 6.69},
    "w2": {"req_per_s": 7.81},
    "w3": {"output_tok_per_s": 9317.0},
    "kv_tokens": 347_648,
    "peak_gib": 66_226 / 1024,
    "peak_reserved_gib": 68_248 / 1024,
}
# The targets: (direction, bound) per metric.
TARGETS: dict[str, tuple[str, float]] = {
    "W1 TTFT ms": ("<=", 30.0),
    "W1 TPOT ms": ("<=", 5.6),
    "W2 requests/s": (">=", 11.0),
    "W3 output tokens/s": (">=", 14_000.0),
    "chat2 TTFT turn 2 / turn 1": ("<", 0.30),
    "KV cache tokens": (">=", 340_000.0),
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


def comparison(res: dict, lmdeploy: dict | None) -> list[tuple[str, object, object, object, bool]]:
    """(metric, vlmdeploy, LMDeploy, transformers, higher is better) rows. A value is a number,
    None where a system was not measured, or a string ("error", "skipped") where it failed."""
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

    rows: list[tuple[str, object, object, object, bool]] = [
        ("W1 TTFT ms", ours("w1", "ttft_ms"), lm["W1 TTFT ms"], theirs("ttft_ms"), False),
        ("W1 TPOT ms", ours("w1", "tpot_ms"), lm["W1 TPOT ms"], theirs("tpot_ms"), False),
        ("W2 requests/s", ours("w2", "requests_per_s"), lm["W2 requests/s"], None, True),
        (
            "W3 output tokens/s",
            ours("w3", "output_tokens_per_s"),
            lm["W3 output tokens/s"],
            None,
            True,
        ),
        ("chat2 TTFT turn 1 ms", ours("chat2", "ttft1_ms"), None, None, False),
        ("chat2 TTFT turn 2 ms", ours("chat2", "ttft2_ms"), None, None, False),
        ("chat2 TTFT turn 2 / turn 1", ours("chat2", "ratio"), None, None, False),
        ("chat2 turn-2 cached tokens", ours("chat2", "cached_tokens"), None, None, True),
        ("KV cache tokens", res.get("kv_tokens"), lm["KV cache tokens"], None, True),
        (
            "peak GPU memory allocated GiB",
            res.get("peak_gib"),
            lm["peak GPU memory allocated GiB"],
            None,
            False,
        ),
        (
            "peak GPU memory reserved GiB",
            res.get("peak_reserved_gib"),
            lm["peak GPU memory reserved GiB"],
            None,
            False,
        ),
    ]
    return rows


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def target_cell(metric: str, value: object) -> tuple[str, str]:
    if metric not in TARGETS:
        return "", ""
    op, bound = TARGETS[metric]
    text = f"{op.replace('<=', '≤').replace('>=', '≥')} {bound:,g}"
    if not _is_num(value):
        return text, "–"
    ok = {"<=": value <= bound, "<": value < bound, ">=": value >= bound}[op]
    return text, "yes" if ok else "no"


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
    plot: str | None = None,
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
    lines = [
        f"### {res.get('date', '?')} — {res.get('device', '?')}",
        "",
        f"Model: {res.get('model')} (load format {res.get('load_format')}). Settings: "
        f"session_len {s.get('session_len')}, prefix caching "
        f"{'on' if s.get('enable_prefix_caching') else 'off'}, cache_max_entry_count "
        f"{s.get('cache_max_entry_count')}, W2 {s.get('n2')} / W3 {s.get('n3')} requests; "
        f"engine start {cell(res.get('init_s'))} s. KV cache {kv} tokens; peak GPU memory {peak}. "
        f"The transformers column was measured in the same call; {lm_where}.",
        "",
        f"| metric | vlmdeploy | target | met | {lm_label} | transformers |",
        "|---|---:|---:|:-:|---:|---:|",
    ]
    for m, a, b, c, _ in comparison(res, lmdeploy):
        t, ok = target_cell(m, a)
        lines.append(f"| {m} | {cell(a)} | {t} | {ok} | {cell(b)} | {cell(c)} |")
    runs = [
        f"{name.upper()} runs in a row: {', '.join(f'{x:,}' for x in res[name]['runs'])} "
        f"({'requests/s' if name == 'w2' else 'output tokens/s'}; the median is in the table)"
        for name in ("w2", "w3")
        if isinstance(res.get(name), dict) and len(res[name].get("runs", [])) > 1
    ]
    w1 = res.get("w1") if isinstance(res.get("w1"), dict) else {}
    if "ttft_runs" in w1:
        runs.append(
            f"W1 TTFT: median of {w1['ttft_runs']} requests, each with its own image "
            f"({w1['ttft_min_ms']:.1f}–{w1['ttft_max_ms']:.1f} ms)"
        )
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
    if plot:
        lines += ["", f"![vlmdeploy against the baselines]({plot})"]
    return "\n".join(lines) + "\n"


def svg_plot(res: dict, lmdeploy: dict | None, label: str = "LMDeploy") -> str:
    """Bars of each metric relative to LMDeploy (higher is better; latencies inverted)."""
    rows = [
        (m, a, b, hi)
        for m, a, b, _, hi in comparison(res, lmdeploy)
        if _is_num(a) and _is_num(b) and a and b
    ]
    width, bar, gap = 640, 18, 14
    height = 40 + len(rows) * (2 * bar + gap)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="12">',
        f'<text x="10" y="20">relative to {label} (1.0 = equal; lower-is-better inverted)</text>',
    ]
    ratios = [(m, a / b if hi else b / a) for m, a, b, hi in rows]
    scale = (width - 260) / max([2.0] + [r for _, r in ratios])
    y = 40
    for m, ratio in ratios:
        out += [
            f'<text x="10" y="{y + bar - 4}">{m}</text>',
            f'<rect x="220" y="{y}" width="{ratio * scale:.1f}" height="{bar}" fill="#2b6cb0"/>',
            f'<text x="{226 + ratio * scale:.1f}" y="{y + bar - 4}">vlmdeploy {ratio:.2f}x</text>',
            f'<rect x="220" y="{y + bar}" width="{scale:.1f}" height="{bar}" fill="#a0aec0"/>',
            f'<text x="{226 + scale:.1f}" y="{y + 2 * bar - 4}">LMDeploy 1.00x</text>',
        ]
        y += 2 * bar + gap
    return "\n".join(out + ["</svg>"]) + "\n"


def write_outputs(res: dict, args: argparse.Namespace) -> str:
    """Append the markdown section (and an SVG beside it) to ``args.out``; returns the section."""
    if args.lmdeploy:
        lmdeploy = json.loads(Path(args.lmdeploy).read_text())
    else:
        lmdeploy = LMDEPLOY_QUOTED if args.lmdeploy_note else None
    label = lmdeploy_label(lmdeploy, args.lmdeploy_note, args.lmdeploy_label)
    plot = None
    if args.out and lmdeploy:
        plot = f"benchmarks-{res.get('date', 'results')}.svg"
        (Path(args.out).parent / plot).write_text(svg_plot(res, lmdeploy, label))
    text = markdown(res, lmdeploy, plot, args.lmdeploy_note, args.lmdeploy_label)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)
    return text
