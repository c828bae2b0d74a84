"""The mixed-traffic report: W4 (offline, ``benchmarks.engine --workloads w4`` and
``benchmarks.lmdeploy_w4``) and S2 (the server under Poisson load, ``benchmarks.s2`` against each
system's ``api_server``), vlmdeploy beside LMDeploy from one device call, against the targets:

* W4: requests/s and output tokens/s ≥ 1.3 × LMDeploy's;
* S2: at the rate where LMDeploy reaches its throughput (the lowest rate whose requests/s is within
  5% of its best), our TTFT p99 ≤ 0.5 × LMDeploy's; our saturation throughput (best requests/s over
  the rates) ≥ 1.3 × LMDeploy's; through HTTP we keep ≥ 90% of our offline W4 output tokens/s.

    python -m benchmarks.mixed --w4 w4.json --lmdeploy-w4 lmdeploy_w4.json --s2 s2.json \\
        --lmdeploy-s2 lmdeploy_s2.json --out mixed.md --csv results.csv

Every input is optional; a check whose numbers are missing shows "–". ``--csv`` appends W4's rows
for both systems (S2's rows come from ``benchmarks.s2`` itself).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from benchmarks import results

SPEEDUP, TTFT_RATIO, HTTP_SHARE, KNEE = 1.3, 0.5, 0.9, 0.95
LMDEPLOY = "lmdeploy-0.18"


def _num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _cell(v: object, digits: int = 2) -> str:
    if not _num(v):
        return "–"
    return f"{v:,.{digits}f}" if abs(v) < 100 else f"{v:,.0f}"


def _load(path: str | Path | None) -> dict:
    return json.loads(Path(path).read_text()) if path and Path(path).exists() else {}


def _rate(key: str) -> float:
    return float(key)


def knee(curve: dict[str, dict]) -> str | None:
    """The lowest rate whose requests/s is within 5% of the best over all rates."""
    done = {k: s for k, s in curve.items() if _num(s.get("req_per_s"))}
    if not done:
        return None
    best = max(s["req_per_s"] for s in done.values())
    return min((k for k, s in done.items() if s["req_per_s"] >= KNEE * best), key=_rate)


def best(curve: dict[str, dict], key: str) -> float | None:
    vals = [s[key] for s in curve.values() if _num(s.get(key))]
    return max(vals) if vals else None


def checks(w4: dict, lm_w4: dict, s2: dict, lm_s2: dict) -> list[tuple[str, object, str, object]]:
    """(what, measured, target, met: True / False / None when not measurable) per target."""
    def ratio(a: object, b: object) -> float | None:
        return a / b if _num(a) and _num(b) and b else None

    def ge(v: float | None, bound: float) -> bool | None:
        return None if v is None else v >= bound

    out = []
    for key, name in (("requests_per_s", "requests/s"), ("output_tokens_per_s", "output tokens/s")):
        r = ratio(w4.get(key), lm_w4.get(key))
        out.append((f"W4 {name} / LMDeploy's", r, f"≥ {SPEEDUP}", ge(r, SPEEDUP)))
    k = knee(lm_s2)
    theirs = lm_s2.get(k, {}).get("ttft_p99_ms") if k else None
    ours = s2.get(k, {}).get("ttft_p99_ms") if k else None
    r = ratio(ours, theirs)
    out.append((f"S2 TTFT p99 / LMDeploy's at its knee ({k or '?'}/s)", r, f"≤ {TTFT_RATIO}",
                None if r is None else r <= TTFT_RATIO))
    r = ratio(best(s2, "req_per_s"), best(lm_s2, "req_per_s"))
    out.append(("S2 saturation requests/s / LMDeploy's", r, f"≥ {SPEEDUP}", ge(r, SPEEDUP)))
    r = ratio(best(s2, "output_tok_per_s"), w4.get("output_tokens_per_s"))
    out.append(("S2 best output tokens/s / offline W4's", r, f"≥ {HTTP_SHARE}",
                ge(r, HTTP_SHARE)))
    return out


def markdown(w4_res: dict, lm_w4_res: dict, s2_res: dict, lm_s2_res: dict) -> str:
    w4, lm_w4 = w4_res.get("w4", {}), lm_w4_res.get("w4", {})
    s2, lm_s2 = s2_res.get("curve", {}), lm_s2_res.get("curve", {})
    device = w4_res.get("device") or s2_res.get("device") or "?"
    lines = [
        f"## Mixed traffic (W4, S2), {w4_res.get('date', '?')} {w4_res.get('time_utc', '')} UTC, "
        f"commit {w4_res.get('commit') or 'unknown'}",
        "",
        f"Device: {device}. Model: {w4_res.get('model_shape') or w4_res.get('model', '?')}, "
        "random weights. "
        + (f"LMDeploy ({lm_w4_res.get('system') or 'its api_server'}) ran on the same checkpoint "
           "in the same call; both" if lm_w4_res or lm_s2_res else "LMDeploy was not measured; "
           "vlmdeploy")
        + " with defaults (session_len 8192, cache_max_entry_count 0.8, prefix caching on).",
        "",
        "| W4 (offline) | vlmdeploy | LMDeploy | ratio |",
        "|---|---:|---:|---:|",
    ]
    for key, name in (("requests_per_s", "requests/s"), ("output_tokens_per_s", "output tokens/s"),
                      ("input_tokens_per_s", "input tokens/s")):
        a, b = w4.get(key), lm_w4.get(key)
        lines.append(f"| {name} | {_cell(a)} | {_cell(b)} | "
                     f"{_cell(a / b) if _num(a) and _num(b) and b else '–'} |")
    lines += ["", "| S2 rate /s | system | requests/s | output tok/s | TTFT p50 ms | TTFT p99 ms "
              "| TPOT p50 ms | TPOT p99 ms | failed |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for k in sorted(set(s2) | set(lm_s2), key=_rate):
        for name, curve in (("vlmdeploy", s2), ("LMDeploy", lm_s2)):
            if k in curve:
                s = curve[k]
                lines.append(
                    f"| {k} | {name} | {_cell(s.get('req_per_s'))} | "
                    f"{_cell(s.get('output_tok_per_s'))} | {_cell(s.get('ttft_p50_ms'))} | "
                    f"{_cell(s.get('ttft_p99_ms'))} | {_cell(s.get('tpot_p50_ms'))} | "
                    f"{_cell(s.get('tpot_p99_ms'))} | {s.get('failed', '–')} |")
    lines += ["", "| target | measured | bound | met |", "|---|---:|---:|:-:|"]
    for what, v, bound, met in checks(w4, lm_w4, s2, lm_s2):
        ok = "–" if met is None else "yes" if met else "no"
        lines.append(f"| {what} | {_cell(v)} | {bound} | {ok} |")
    return "\n".join(lines) + "\n"


def w4_rows(w4_res: dict, lm_w4_res: dict) -> list[dict[str, str]]:
    """W4's rows for the results history, both systems (LMDeploy's only beside ours)."""
    st = results.Stamp(w4_res.get("date", ""), w4_res.get("time_utc", ""),
                       w4_res.get("commit", ""), w4_res.get("device", ""))
    shape = w4_res.get("model_shape", "")
    out = []
    for system, r, note in (("vlmdeploy", w4_res.get("w4", {}), ""),
                            (LMDEPLOY, lm_w4_res.get("w4", {}), "same call")):
        for key, unit in (("requests_per_s", "req/s"), ("output_tokens_per_s", "tok/s"),
                          ("input_tokens_per_s", "tok/s")):
            if _num(r.get(key)):
                out.append(results.row(st, shape, "W4", key, system, r[key], unit,
                                       "; ".join(x for x in (note, f"{r.get('requests')} "
                                                             "requests") if x)))
    return out if w4_res.get("w4") else []


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in ("w4", "lmdeploy-w4", "s2", "lmdeploy-s2"):
        ap.add_argument(f"--{name}", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--csv", default=None)
    args = ap.parse_args(argv)
    w4, lm_w4 = _load(args.w4), _load(args.lmdeploy_w4)
    text = markdown(w4, lm_w4, _load(args.s2), _load(args.lmdeploy_s2))
    if args.out:
        Path(args.out).write_text(text)
    if args.csv:
        results.append(args.csv, w4_rows(w4, lm_w4))
    print(text, end="")
    return text


if __name__ == "__main__":
    main()
