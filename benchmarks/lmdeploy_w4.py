"""W4 through LMDeploy's pipeline: the reference system on the very request list that
``python -m benchmarks.engine --workloads w4`` sends to vlmdeploy (``benchmarks/w4.py``, same seed,
same session length, so the same mix), to put the two side by side from one device call.

It runs where LMDeploy is importable: on the GPU machine with the wheels of the reference harness
(``../shared/anchors/lmdeploy/prepare.sh`` makes them; ``run_device.sh`` shows the PYTHONPATH).
The same engine settings as ours: ``session_len`` 8192, ``cache_max_entry_count`` 0.8, prefix
caching on (``--no-prefix-caching`` for off), one warm-up batch of two requests first.

    PYTHONPATH=/tmp/site:anchors/.site:. python3 -m benchmarks.lmdeploy_w4 --model /tmp/ivl35-8b \\
        --json $OUT/lmdeploy_w4.json
    python -m benchmarks.engine --model /tmp/ivl35-8b --workloads w4 --json $OUT/ours.json

The JSON holds ``{"w4": {...}}`` with the keys of our engine's W4 result (requests/s, output and
input tokens/s, short outputs, the mix's summary).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

from benchmarks.w4 import W4Spec, w4_requests
from benchmarks.w4 import summary as w4_summary

SEED = 40  # benchmarks.engine's W4 seed for its first (or only) run


class _Encoder:
    """What ``text_of`` needs of a tokenizer: ids of a text without special tokens, as
    vlmdeploy's tokenizer gives them."""

    def __init__(self, hf):
        self.hf = hf

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint directory (-HF format)")
    ap.add_argument("--n4", type=int, default=256)
    ap.add_argument("--session-len", type=int, default=8192)
    ap.add_argument("--cache-max-entry-count", type=float, default=0.8)
    ap.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--json", required=True, help="write the results here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import lmdeploy
    from lmdeploy import GenerationConfig, PytorchEngineConfig, pipeline
    from transformers import AutoTokenizer

    tok = _Encoder(AutoTokenizer.from_pretrained(args.model))
    cfg = PytorchEngineConfig(session_len=args.session_len,
                              cache_max_entry_count=args.cache_max_entry_count,
                              enable_prefix_caching=args.prefix_caching)
    now = datetime.datetime.now(datetime.timezone.utc)
    res: dict = {"date": now.date().isoformat(), "time_utc": now.strftime("%H:%M:%S"),
                 "system": f"lmdeploy {lmdeploy.__version__}", "model": args.model,
                 "settings": {k: getattr(args, k) for k in
                              ("n4", "session_len", "cache_max_entry_count", "prefix_caching",
                               "seed")}}
    t = time.perf_counter()
    pipe = pipeline(args.model, backend_config=cfg)
    res["init_s"] = round(time.perf_counter() - t, 1)
    try:
        warm = w4_requests(tok, args.seed + 1000, W4Spec.for_session(args.session_len, 2))
        pipe([m for m, _ in warm], gen_config=[GenerationConfig(**g) for _, g in warm])
        reqs = w4_requests(tok, args.seed, W4Spec.for_session(args.session_len, args.n4))
        configs = [GenerationConfig(**g) for _, g in reqs]
        t0 = time.perf_counter()
        out = pipe([m for m, _ in reqs], gen_config=configs)
        wall = time.perf_counter() - t0
    finally:
        pipe.close()
    n_in = sum(r.input_token_len for r in out)
    n_gen = sum(r.generate_token_len for r in out)
    res["w4"] = {
        "requests": len(reqs),
        "wall_s": wall,
        "requests_per_s": len(reqs) / wall,
        "input_tokens_per_s": n_in / wall,
        "output_tokens_per_s": n_gen / wall,
        "short_outputs": sum(r.generate_token_len != c.max_new_tokens
                             for r, c in zip(out, configs)),
        "mix": w4_summary(reqs),
    }
    Path(args.json).write_text(json.dumps(res, indent=1))
    w4 = res["w4"]
    print(f"LMDeploy W4: {w4['requests']} requests in {wall:.1f} s, {w4['requests_per_s']:.2f} "
          f"req/s, out {w4['output_tokens_per_s']:,.0f} tok/s, short outputs "
          f"{w4['short_outputs']}", flush=True)
    return res


if __name__ == "__main__":
    main()
