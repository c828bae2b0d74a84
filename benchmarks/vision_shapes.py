"""What a new tile count costs the vision encoder: the first call at each count, then the same
count again, in one process after a warm-up at ``--warm``. A first call much slower than the second
is per-shape set-up (algorithm search, attention plan) that a serving run pays mid-batch. A last
column gives the median of ``--repeat`` more calls at that count (the steady cost).

    python benchmarks/vision_shapes.py --preset 8b --counts 64,1,7,13,33,64,50
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import model_source, timed_ms  # noqa: E402  (benchmarks/engine.py, beside this script)

from vlmdeploy import PytorchEngineConfig, pipeline  # noqa: E402

BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--preset", help="write config + tokenizer of this size, dummy weights")
    ap.add_argument("--warm", type=int, default=64, help="tile count of the warm-up call")
    ap.add_argument("--counts", default="64,1,7,13,33,64,50")
    ap.add_argument("--sdpa", default="default", choices=["default", *BACKENDS],
                    help="the one attention backend SDPA may use")
    ap.add_argument("--repeat", type=int, default=15, help="steady calls timed per count")
    ap.add_argument("--out", default="vision_shapes.md")
    args = ap.parse_args()
    model, load_format = model_source(args.model, args.preset)
    cfg = PytorchEngineConfig(session_len=8192, load_format=load_format)
    with pipeline(model, backend_config=cfg) as pipe:
        encode = pipe.engine.runner.encode_images
        side = pipe.model_cfg.vision.image_size
        gen = torch.Generator().manual_seed(0)

        def tiles(n: int) -> torch.Tensor:
            return torch.randint(0, 256, (n, side, side, 3), dtype=torch.uint8, generator=gen)

        backend = (contextlib.nullcontext() if args.sdpa == "default"
                   else sdpa_kernel([BACKENDS[args.sdpa]]))
        rows = ["| tiles | first call ms | second call ms | first − second ms | median ms |",
                "|---:|---:|---:|---:|---:|"]
        with backend:
            encode(tiles(args.warm))
            for n in (int(c) for c in args.counts.split(",")):
                x = tiles(n)
                first = timed_ms(encode, x)
                second = timed_ms(encode, x)
                steady = statistics.median(timed_ms(encode, x) for _ in range(args.repeat))
                rows.append(f"| {n} | {first:.1f} | {second:.1f} | {first - second:.1f} "
                            f"| {steady:.1f} |")
                print(rows[-1], flush=True)
    text = (f"### vision encoder, first call per tile count (warm-up at {args.warm}; SDPA "
            f"backend {args.sdpa})\n\n")
    Path(args.out).write_text(text + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
