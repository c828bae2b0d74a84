"""Device checks of the core engine (run on the GPU machine with ``pytest -m gpu tests``).

* an InternVL3.5-8B-shape random checkpoint in each layout loads and generates on one GPU;
* on a 1B-shape random checkpoint, bf16 greedy tokens match transformers for 32 tokens; where they
  diverge,
  the reference's own top-2 logit margin at that step must be within bf16 noise (reported either
  way).
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from vlmdeploy import GenerationConfig, PytorchEngineConfig, pipeline
from vlmdeploy.testing.checkpoint import make_checkpoint
from vlmdeploy.vl.tiling import as_pixel_values

pytestmark = pytest.mark.gpu
ROOT = os.environ.get("VLMDEPLOY_GPU_TMP", "/tmp/vlmdeploy-gpu")


def _image(w: int, h: int, seed: int):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
    return Image.fromarray(arr)


@pytest.mark.parametrize("fmt", ["original", "hf"])
def test_8b_loads_and_generates(fmt):
    path = f"{ROOT}/8b-{fmt}"
    t0 = time.perf_counter()
    make_checkpoint(path, "8b", fmt, seed=0, dtype=torch.bfloat16, device="cuda")
    t1 = time.perf_counter()
    with pipeline(path, backend_config=PytorchEngineConfig(session_len=8192)) as pipe:
        t2 = time.perf_counter()
        gen = GenerationConfig(max_new_tokens=16, ignore_eos=True)
        out = pipe(
            [
                ("describe this image", _image(448, 448, 1)),
                ("and this one", _image(1024, 1024, 2)),
                "hello",
            ],
            gen_config=gen,
        )
        t3 = time.perf_counter()
        assert [r.generate_token_len for r in out] == [16, 16, 16]
        assert out[0].input_token_len > 256 and out[1].input_token_len > 2560
        blocks = pipe.engine.core.num_blocks
    print(
        f"\n8B {fmt}: write {t1 - t0:.0f}s, load {t2 - t1:.0f}s, 3 requests x 16 tokens "
        f"{t3 - t2:.2f}s, KV blocks {blocks} ({blocks * 64} tokens)"
    )
    import shutil

    shutil.rmtree(path)


def test_1b_bf16_greedy_matches_transformers(ckpt_1b):
    from transformers import InternVLForConditionalGeneration

    path = ckpt_1b("hf")
    ref = InternVLForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    steps = 32
    gen = GenerationConfig(max_new_tokens=steps, min_new_tokens=steps)
    report = []
    with pipeline(path, backend_config=PytorchEngineConfig(session_len=4096)) as pipe:
        for prompt in ["Tell me about the sea.", ("describe this image", _image(800, 500, 3))]:
            req = pipe.prepare_sync(prompt, gen)
            ours = pipe(prompt, gen_config=gen).token_ids
            ids = torch.tensor([req.token_ids], device="cuda")
            extra = {}
            if req.images:
                tiles = [as_pixel_values(im.pixels()) for im in req.images]
                extra["pixel_values"] = torch.cat(tiles).cuda()
            out = ref.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                **extra,
                do_sample=False,
                max_new_tokens=steps,
                min_new_tokens=steps,
                output_logits=True,
                return_dict_in_generate=True,
            )
            theirs = out.sequences[0, ids.shape[1] :].tolist()
            diverge = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
            if diverge is None:
                report.append(f"{type(prompt).__name__}: {steps}/{steps} tokens equal")
                continue
            logits = out.logits[diverge][0].float()
            top2 = logits.topk(2).values
            margin = float(top2[0] - top2[1])
            report.append(
                f"{type(prompt).__name__}: diverges at token {diverge}, reference top-2 "
                f"margin {margin:.4f} (top-1 logit {float(top2[0]):.3f})"
            )
            # a divergence is acceptable only where the reference itself is within bf16 rounding
            assert margin <= 0.02 * abs(float(top2[0])) + 0.05, report[-1]
    print("\n" + "\n".join(report))
