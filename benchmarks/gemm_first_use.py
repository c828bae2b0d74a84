"""What a GEMM of a new row count costs the first time: the language model's four weight shapes
(InternVL3.5-8B: qkv, o, gate_up, down; bf16) at token counts never seen before in the process,
first call against second call. Then the same after a warm-up ladder (--ladder), to see whether
running a few sizes at start-up takes the first-use cost away for sizes in between.

    python benchmarks/gemm_first_use.py --counts 483,1000,2731,5000 \
        --ladder 16,64,256,1024,4096,8192
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import timed_ms  # noqa: E402  (benchmarks/engine.py, beside this script)

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 24576), "down": (12288, 4096)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="483,1000,2731,5000")
    ap.add_argument("--ladder", default="", help="token counts run once before the second pass")
    ap.add_argument("--out", default="gemm_first_use.md")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    weights = {k: torch.randn(n, k_, device=dev, dtype=dtype) * 0.02
               for k, (k_, n) in SHAPES.items()}

    def inputs(m: int) -> dict[str, torch.Tensor]:
        return {name: torch.randn(m, k, device=dev, dtype=dtype) for name, (k, _) in SHAPES.items()}

    def run(xs: dict[str, torch.Tensor]) -> None:
        for name, x in xs.items():
            torch.nn.functional.linear(x, weights[name])

    run(inputs(8))  # library initialisation
    rows = ["| pass | tokens | first call ms | second call ms |", "|---|---:|---:|---:|"]
    counts = [int(c) for c in args.counts.split(",")]
    for label, offset in (("cold", 0), ("after ladder", 1)):
        if offset and args.ladder:
            for m in (int(c) for c in args.ladder.split(",")):
                run(inputs(m))
        elif offset:
            break
        for m in counts:
            xs = inputs(m + offset)  # offset: sizes not seen in the first pass either
            first, second = timed_ms(run, xs), timed_ms(run, xs)
            rows.append(f"| {label} | {m + offset} | {first:.2f} | {second:.2f} |")
            print(rows[-1], flush=True)
    name = torch.cuda.get_device_name() if dev == "cuda" else "CPU"
    text = f"### GEMM first use, {dev} ({name})"
    open(args.out, "w").write(text + "\n\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
