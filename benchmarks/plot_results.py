"""One plot of the results history: each workload's vlmdeploy / LMDeploy ratio over the runs that
measured both in the same call (latencies inverted, so above 1 means vlmdeploy is ahead).

Only same-call pairs are drawn because cards of one type differ by a few percent between machines;
a quoted baseline would mix that into the ratio. The SVG is written by hand (no plotting library
is a dependency) and is a pure function of the CSV, so it can be checked against it.

    python -m benchmarks.plot_results [--csv docs/results.csv] [--out docs/results.svg]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from benchmarks.results import HISTORY, read

BASELINE = "lmdeploy-0.18"
# (workload, metric, label, higher is better)
SERIES = (
    ("W1", "ttft_ms", "W1 TTFT", False),
    ("W1", "tpot_ms", "W1 TPOT", False),
    ("W2", "requests_per_s", "W2 requests/s", True),
    ("W3", "output_tokens_per_s", "W3 output tokens/s", True),
)
COLOURS = ("#2b6cb0", "#c05621", "#2f855a", "#6b46c1")
WIDTH, HEIGHT = 760, 400
LEFT, RIGHT, TOP, BOTTOM = 60, 580, 60, 300  # the plot area
# The axis stops here so that ratios near 1 stay readable; a point above it sits on the top edge
# with its value written beside it (W1's TTFT ratio runs to several times the others).
CAP = 2.5


def card(device: str) -> str:
    """The accelerator's model from a device line ("NVIDIA H100 80GB HBM3, ..." -> "H100")."""
    m = re.search(r"\b([A-Z]\d{2,3}[A-Z]?)\b", device)
    return m.group(1) if m else device.split(",")[0][:12]


def ratios(rows: list[dict[str, str]]) -> list[tuple[str, dict[str, float]]]:
    """[(run label, {series label: ratio})] for every run with a same-call baseline, in time
    order."""
    runs: dict[tuple[str, str, str], dict[tuple[str, str, str], float]] = {}
    for r in rows:
        if r["time_utc"]:  # a run without a time is a quoted number, not a call
            key = (r["date"], r["time_utc"], r["device"])
            runs.setdefault(key, {})[(r["system"], r["workload"], r["metric"])] = float(r["value"])
    out = []
    for (date, time, device), vals in sorted(runs.items()):
        point = {}
        for workload, metric, label, higher in SERIES:
            ours = vals.get(("vlmdeploy", workload, metric))
            theirs = vals.get((BASELINE, workload, metric))
            if ours and theirs:
                point[label] = ours / theirs if higher else theirs / ours
        if point:
            out.append((f"{date[5:]} {time[:5]} {card(device)}", point))
    return out


def svg(points: list[tuple[str, dict[str, float]]]) -> str:
    top = min(CAP, max([2.0] + [v for _, p in points for v in p.values()]))
    top = -(-top * 2 // 1) / 2  # up to the next 0.5
    n = max(len(points), 2)
    x = lambda i: LEFT + (RIGHT - LEFT) * i / (n - 1)
    y = lambda v: BOTTOM - (BOTTOM - TOP) * min(v, top) / top
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        'font-family="sans-serif" font-size="12">',
        f'<text x="{LEFT}" y="20" font-size="14">vlmdeploy relative to LMDeploy 0.18 in the same '
        'call</text>',
        f'<text x="{LEFT}" y="38" fill="#555">above 1: vlmdeploy ahead (latencies inverted); '
        f'values over {top:g} sit on the top edge, labelled</text>',
    ]
    for k in range(int(top * 2) + 1):
        v = k / 2
        dash = ' stroke-dasharray="4 3"' if v == 1 else ""
        colour = "#333" if v == 1 else "#ddd"
        out.append(f'<line x1="{LEFT}" y1="{y(v):.1f}" x2="{RIGHT}" y2="{y(v):.1f}" '
                   f'stroke="{colour}"{dash}/>')
        out.append(f'<text x="{LEFT - 8}" y="{y(v) + 4:.1f}" text-anchor="end">{v:g}</text>')
    for i, (label, _) in enumerate(points):
        out.append(f'<text x="{x(i):.1f}" y="{BOTTOM + 14}" '
                   f'transform="rotate(40 {x(i):.1f} {BOTTOM + 14})">{label}</text>')
    for (_, _, name, _), colour in zip(SERIES, COLOURS):
        pts = [(x(i), y(p[name])) for i, (_, p) in enumerate(points) if name in p]
        if len(pts) > 1:
            path = " ".join(f"{a:.1f},{b:.1f}" for a, b in pts)
            out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" '
                       'stroke-width="2"/>')
        out += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{colour}"/>' for a, b in pts]
        out += [f'<text x="{x(i) + 4:.1f}" y="{y(top) - 6:.1f}" fill="{colour}" font-size="10">'
                f'{p[name]:.1f}</text>'
                for i, (_, p) in enumerate(points) if p.get(name, 0) > top]
    for k, ((_, _, name, _), colour) in enumerate(zip(SERIES, COLOURS)):
        yy = TOP + 10 + 20 * k
        out.append(f'<line x1="{RIGHT + 20}" y1="{yy}" x2="{RIGHT + 40}" y2="{yy}" '
                   f'stroke="{colour}" stroke-width="2"/>')
        out.append(f'<text x="{RIGHT + 46}" y="{yy + 4}">{name}</text>')
    return "\n".join(out + ["</svg>"]) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--csv", type=Path, default=HISTORY)
    ap.add_argument("--out", type=Path, default=HISTORY.with_suffix(".svg"))
    args = ap.parse_args(argv)
    points = ratios(read(args.csv))
    args.out.write_text(svg(points))
    print(f"{len(points)} runs drawn into {args.out}")


if __name__ == "__main__":
    main()
