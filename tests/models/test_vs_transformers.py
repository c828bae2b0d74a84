"""Our model and engine against transformers' InternVLForConditionalGeneration on the same weights
(fp32, CPU).

The bar: last-token logits equal within a max relative error of 1e-4 at prefill and at each step of
a 32-token greedy decode, and identical greedy tokens — for text-only, single-image and multi-image
prompts, for both checkpoint layouts, and for an InternViT-6B-style vision tower.
"""

from __future__ import annotations

import pytest
import torch
from transformers import InternVLForConditionalGeneration

from vlmdeploy import GenerationConfig, PytorchEngineConfig, pipeline
from vlmdeploy.vl.constants import IMAGE_TOKEN
from vlmdeploy.vl.tiling import as_pixel_values

STEPS = 32


def reference_greedy(model, input_ids: list[int], pixel_values: torch.Tensor | None, steps: int):
    """Greedy tokens and the raw logits of every step, from transformers."""
    extra = {} if pixel_values is None else {"pixel_values": pixel_values}
    out = model.generate(
        input_ids=torch.tensor([input_ids]),
        attention_mask=torch.ones(1, len(input_ids), dtype=torch.long),
        **extra,
        do_sample=False,
        max_new_tokens=steps,
        min_new_tokens=steps,
        output_logits=True,
        return_dict_in_generate=True,
    )
    tokens = out.sequences[0, len(input_ids) :].tolist()
    return tokens, [lg[0].float() for lg in out.logits]


def run_ours(pipe, prompt, steps: int):
    """Greedy tokens and per-step logits from our engine, recorded at the model runner."""
    seen: list[torch.Tensor] = []
    runner = pipe.engine.core.runner
    run = runner.forward

    def spy(batch, rows, *args):
        logits = run(batch, rows, *args)
        seen.append(logits[0].clone())
        return logits

    runner.forward = spy
    try:
        gen = GenerationConfig(max_new_tokens=steps, min_new_tokens=steps)
        req = pipe.prepare_sync(prompt, gen)
        resp = pipe(prompt, gen_config=gen)
    finally:
        runner.forward = run
    return req, resp.token_ids, seen


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def hf_models(tiny_ckpts):
    return {
        k: InternVLForConditionalGeneration.from_pretrained(
            tiny_ckpts[k], dtype=torch.float32
        ).eval()
        for k in ("hf", "6b-hf")
    }


def prompts(images):
    return {
        "text": "Tell me a story about a tiny model.",
        "single": ("describe this image", images[1]),
        "multi": (
            f"Image-1: {IMAGE_TOKEN}\nImage-2: {IMAGE_TOKEN}\ndescribe these two images",
            [images[0], images[2]],
        ),
    }


@pytest.mark.parametrize("ours,ref", [("original", "hf"), ("hf", "hf"), ("6b-original", "6b-hf")])
def test_logits_and_tokens_match_transformers(tiny_ckpts, hf_models, images, ours, ref):
    pipe = pipeline(
        tiny_ckpts[ours], backend_config=PytorchEngineConfig(session_len=8192, block_size=16)
    )
    try:
        for kind, prompt in prompts(images).items():
            req, tokens, logits = run_ours(pipe, prompt, STEPS)
            tiles = [as_pixel_values(im.pixel_values) for im in req.images]
            pixels = torch.cat(tiles) if tiles else None
            ref_tokens, ref_logits = reference_greedy(hf_models[ref], req.token_ids, pixels, STEPS)
            assert tokens == ref_tokens, f"{ours}/{kind}: greedy tokens differ"
            assert len(logits) == STEPS
            errs = [rel_err(a, b) for a, b in zip(logits, ref_logits)]
            assert max(errs) <= 1e-4, f"{ours}/{kind}: max relative logit error {max(errs):.2e}"
    finally:
        pipe.close()


def test_legacy_hf_layout_loads_the_same_weights(tiny_ckpts):
    from vlmdeploy.config import ModelConfig
    from vlmdeploy.models.build import build_model

    models = [
        build_model(
            tiny_ckpts[k],
            ModelConfig.from_pretrained(tiny_ckpts[k]),
            torch.float32,
            torch.device("cpu"),
        )
        for k in ("original", "hf-legacy")
    ]
    a, b = (dict(m.named_parameters()) for m in models)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
