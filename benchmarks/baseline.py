"""transformers' reference on W1: ``generate`` (SDPA) at batch 1, in the benchmark's process after
the engine has given its memory back."""

from __future__ import annotations

import time

import torch

from benchmarks.workloads import sync


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
