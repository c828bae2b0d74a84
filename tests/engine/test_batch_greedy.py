"""Greedy generation through the engine equals transformers' greedy tokens for every prompt of a
mixed batch (text-only and image prompts of different lengths), also when a deliberately small KV
cache forces preemption and when chunked prefill splits prompts (and images) across steps."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import InternVLForConditionalGeneration

from vlmdeploy import GenerationConfig, PytorchEngineConfig, pipeline
from vlmdeploy.vl.constants import IMAGE_TOKEN
from vlmdeploy.vl.tiling import as_pixel_values

NEW = 24


@pytest.fixture(scope="module")
def reference(tiny_ckpts):
    return InternVLForConditionalGeneration.from_pretrained(
        tiny_ckpts["hf"], dtype=torch.float32
    ).eval()


def batch_prompts(images):
    return [
        "Hi",
        ("describe this image", images[1]),
        "A much longer text-only prompt " * 12,
        (
            f"Image-1: {IMAGE_TOKEN}\nImage-2: {IMAGE_TOKEN}\nwhich is brighter?",
            [images[0], images[2]],
        ),
        [
            {"role": "system", "content": "You are terse."},
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": images[0]},
                    {"type": "text", "text": "what is this?"},
                ],
            },
        ],
    ]


def greedy_reference(model, req) -> list[int]:
    extra = {}
    if req.images:
        extra["pixel_values"] = torch.cat([as_pixel_values(im.pixels()) for im in req.images])
    ids = torch.tensor([req.token_ids])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        **extra,
        do_sample=False,
        max_new_tokens=NEW,
        min_new_tokens=NEW,
    )
    return out[0, len(req.token_ids) :].tolist()


def run_batch(path, images, reference, **engine_kwargs):
    cfg = PytorchEngineConfig(session_len=4096, block_size=16, **engine_kwargs)
    gen = GenerationConfig(max_new_tokens=NEW, min_new_tokens=NEW)
    with pipeline(path, backend_config=cfg) as pipe:
        prompts = batch_prompts(images)
        responses = pipe(prompts, gen_config=gen)
        for prompt, resp in zip(prompts, responses, strict=True):
            req = pipe.prepare_sync(prompt, gen)
            assert resp.token_ids == greedy_reference(reference, req), (
                f"prompt {resp.index} differs"
            )
            assert resp.input_token_len == req.input_token_len
            assert resp.generate_token_len == NEW and resp.finish_reason == "length"
        stats = pipe.stats()
        assert stats["num_running"] == 0 and stats["num_waiting"] == 0
        assert pipe.engine.core.blocks.num_free == pipe.engine.core.num_blocks  # nothing leaked
        return pipe.engine.core.scheduler.num_preemptions, [r.input_token_len for r in responses]


def test_mixed_batch_matches_transformers(tiny_ckpts, images, reference):
    preemptions, _ = run_batch(tiny_ckpts["original"], images, reference)
    assert preemptions == 0


def test_chunked_prefill_keeps_tokens_identical(tiny_ckpts, images, reference):
    # 200-token chunks split the image prompts (and their images) across steps shared with decodes
    run_batch(tiny_ckpts["original"], images, reference, max_prefill_token_num=200)


def test_preemption_keeps_tokens_identical(tiny_ckpts, images, reference):
    with pipeline(tiny_ckpts["original"], PytorchEngineConfig(session_len=4096)) as pipe:
        lengths = [pipe.prepare_sync(p).input_token_len for p in batch_prompts(images)]
    # every prompt is admitted at once, but their growth during decode does not fit: preemption
    blocks = sum(math.ceil(n / 16) for n in lengths) + 2
    preemptions, _ = run_batch(tiny_ckpts["original"], images, reference, num_gpu_blocks=blocks)
    assert preemptions > 0
