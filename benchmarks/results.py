"""The results history: ``docs/results.csv``, one row per (run, system, workload, metric).

Every benchmark of the suite appends its rows here (``--csv``) instead of writing prose, and
``benchmarks/plot_results.py`` draws the history from it. A run is stamped with its UTC date and
time, the commit it measured and the device line, because numbers are only comparable within one
run: cards of one type differ by a few percent from machine to machine, so a baseline counts only
when it ran in the same call.

On the GPU machine the checkout has no git metadata, so the commit comes from ``BENCH_COMMIT``
(set it where the command is written: ``BENCH_COMMIT=$(git rev-parse --short HEAD)``). A device
call writes its rows to a CSV under ``$OUT``; merge them into the history here:

    python -m benchmarks.results merge OUT/results.csv        # into docs/results.csv
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

COLUMNS = ("date", "time_utc", "commit", "device", "model_shape", "workload", "metric", "system",
           "value", "unit", "note")
HISTORY = Path(__file__).resolve().parents[1] / "docs" / "results.csv"


@dataclass(frozen=True)
class Stamp:
    """What identifies a run: rows that share a stamp were measured in the same call."""

    date: str  # UTC, ISO
    time_utc: str  # HH:MM or HH:MM:SS
    commit: str  # short hash, "" when unknown
    device: str


def current_commit(root: Path = HISTORY.parents[1]) -> str:
    """``BENCH_COMMIT``, else the checkout's short hash (``-dirty`` with uncommitted changes to
    tracked files), else "" (no git metadata, as on the GPU machine)."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                              capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return ""
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=root, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return head.stdout.strip() + ("-dirty" if dirty.returncode == 1 else "")


def device_line() -> str:
    """The GPU's name, memory and driver (nvidia-smi) and torch's version; "CPU; torch ..." without
    a GPU. ``benchmarks/device_lib.sh`` writes the same line, so a call's rows group together."""
    import torch  # here: merging and plotting the history need no torch

    if not torch.cuda.is_available():
        return f"CPU; torch {torch.__version__}"
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        )
        name = smi.stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        name = torch.cuda.get_device_name()
    return f"{name}; torch {torch.__version__}"


def stamp(device: str, now: datetime.datetime | None = None, commit: str | None = None) -> Stamp:
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return Stamp(now.date().isoformat(), now.strftime("%H:%M:%S"),
                 current_commit() if commit is None else commit, device)


def fmt_value(value: float) -> str:
    """Four significant digits below 1,000 and whole numbers above: the precision the runs
    support (repeat runs differ in the second or third digit)."""
    if isinstance(value, int) or abs(value) >= 1000:
        return str(round(value))
    return f"{value:.4g}"


def row(st: Stamp, model_shape: str, workload: str, metric: str, system: str, value: float,
        unit: str, note: str = "") -> dict[str, str]:
    return {"date": st.date, "time_utc": st.time_utc, "commit": st.commit, "device": st.device,
            "model_shape": model_shape, "workload": workload, "metric": metric, "system": system,
            "value": fmt_value(value), "unit": unit, "note": note}


def read(path: Path | str = HISTORY) -> list[dict[str, str]]:
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def append(path: Path | str, rows: Iterable[dict[str, str]]) -> int:
    """Append ``rows`` to the CSV at ``path`` (the header first if the file is new); returns how
    many were written."""
    path = Path(path)
    rows = list(rows)
    new = not path.exists() or path.stat().st_size == 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        out = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        if new:
            out.writeheader()
        out.writerows({k: r.get(k, "") for k in COLUMNS} for r in rows)
    return len(rows)


def merge(src: Path | str, dst: Path | str = HISTORY) -> int:
    """Append the rows of ``src`` that ``dst`` does not hold yet; returns how many."""
    have = {tuple(r[k] for k in COLUMNS) for r in read(dst)}
    fresh = [r for r in read(src) if tuple(r.get(k, "") for k in COLUMNS) not in have]
    return append(dst, fresh)


# What tools/ab_engine.sh's JSON files hold, as history rows: (workload, metric, unit, keys).
AB_METRICS = [
    ("W1", "ttft_ms", "ms", ("w1", "ttft_ms")),
    ("W1", "tpot_ms", "ms", ("w1", "tpot_ms")),
    ("W2", "requests_per_s", "req/s", ("w2", "requests_per_s")),
    ("W3", "output_tokens_per_s", "tok/s", ("w3", "output_tokens_per_s")),
]


def ab_rows(folder: Path | str, commits: dict[str, str], note: str,
            model_shape: str = "InternVL3.5-8B") -> list[dict[str, str]]:
    """The rows of an A/B call (``ab-<round>-<base|this>.json`` in ``folder``), each run stamped
    with its own time and the commit of its tree (``commits``: base and this)."""
    rows = []
    for path in sorted(Path(folder).glob("ab-*-*.json")):
        _, rnd, side = path.stem.split("-")
        run = json.loads(path.read_text())
        st = Stamp(run["date"], run["time_utc"], commits[side], run["device"])
        for workload, metric, unit, (part, key) in AB_METRICS:
            value = run.get(part, {}).get(key)
            if value is not None:
                rows.append(row(st, model_shape, workload, metric, "vlmdeploy", value, unit,
                                f"{note}: {side}, round {rnd}"))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Merge a run's results into the history.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="append a run's CSV to the history, skipping known rows")
    m.add_argument("src", type=Path)
    m.add_argument("--into", type=Path, default=HISTORY)
    a = sub.add_parser("ab", help="append an A/B call's runs (tools/ab_engine.sh's JSON files)")
    a.add_argument("folder", type=Path)
    a.add_argument("--base-commit", required=True)
    a.add_argument("--this-commit", required=True)
    a.add_argument("--note", required=True)
    a.add_argument("--into", type=Path, default=HISTORY)
    args = ap.parse_args(argv)
    if args.cmd == "ab":
        commits = {"base": args.base_commit, "this": args.this_commit}
        n = append(args.into, ab_rows(args.folder, commits, args.note))
        print(f"{n} rows appended to {args.into}")
        return
    print(f"{merge(args.src, args.into)} rows appended to {args.into}")


if __name__ == "__main__":
    main()
