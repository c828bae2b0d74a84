"""GPT-OSS (InternVL3.5-GPT-OSS-20B-A4B) against transformers' InternVLForConditionalGeneration
with its GPT-OSS text model, on the same tiny random weights (fp32, CPU), through the real
pipeline: last-token logits within 1e-4 relative and identical greedy tokens in both checkpoint
layouts, for prompts longer than the sliding window (8 here), in a batch, with chunked prefill and
with preemption. The MoE pieces (router, clamped SwiGLU experts) are checked against
transformers' modules with weights large enough to reach the clamps.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GptOssConfig, InternVLForConditionalGeneration
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP as TheirMLP

from vlmdeploy import GenerationConfig, PytorchEngineConfig, pipeline
from vlmdeploy.config import ModelConfig
from vlmdeploy.models.gpt_oss import GptOssMLP
from vlmdeploy.testing.checkpoint import make_checkpoint
from vlmdeploy.vl.constants import IMAGE_TOKEN
from vlmdeploy.vl.tiling import as_pixel_values

STEPS = 32
STORY = "Tell me a story about a tiny model that learned to look only at its last few tokens."


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("gpt-oss")
    return {fmt: str(make_checkpoint(root / fmt, "tiny-gpt-oss", fmt, seed=0))
            for fmt in ("original", "hf")}


@pytest.fixture(scope="module")
def reference(ckpts):
    return InternVLForConditionalGeneration.from_pretrained(
        ckpts["hf"], dtype=torch.float32
    ).eval()


def reference_greedy(model, req, steps: int):
    tiles = [as_pixel_values(im.pixels()) for im in req.images]
    extra = {"pixel_values": torch.cat(tiles)} if tiles else {}
    out = model.generate(
        input_ids=torch.tensor([req.token_ids]),
        attention_mask=torch.ones(1, len(req.token_ids), dtype=torch.long),
        **extra,
        do_sample=False,
        max_new_tokens=steps,
        min_new_tokens=steps,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences[0, len(req.token_ids):].tolist(), [lg[0].float() for lg in out.logits]


def engine(path: str, **kw) -> PytorchEngineConfig:
    return PytorchEngineConfig(session_len=4096, block_size=16, device_type="cpu", **kw)


def test_config_is_gpt_oss_in_both_layouts(ckpts):
    a, b = (ModelConfig.from_pretrained(ckpts[f]).text for f in ("original", "hf"))
    assert a == b and a.is_gpt_oss and a.sliding_window == 8
    assert [a.layer_window(i) for i in range(4)] == [8, None, 8, None]


@pytest.mark.parametrize("fmt", ["original", "hf"])
def test_logits_and_tokens_match_transformers(ckpts, reference, images, fmt):
    prompts = {
        "text": STORY,
        "single": ("describe this image", images[1]),
        "multi": (f"Image-1: {IMAGE_TOKEN}\nImage-2: {IMAGE_TOKEN}\ncompare them",
                  [images[0], images[2]]),
    }
    with pipeline(ckpts[fmt], backend_config=engine(ckpts[fmt])) as pipe:
        runner = pipe.engine.core.runner
        run = runner.forward
        for kind, prompt in prompts.items():
            seen: list[torch.Tensor] = []

            def spy(batch, rows, *args, seen=seen):
                logits = run(batch, rows, *args)
                seen.append(logits[0].clone())
                return logits

            runner.forward = spy
            try:
                gen = GenerationConfig(max_new_tokens=STEPS, min_new_tokens=STEPS)
                req = pipe.prepare_sync(prompt, gen)
                tokens = pipe(prompt, gen_config=gen).token_ids
            finally:
                runner.forward = run
            assert len(req.token_ids) > 8, "the prompt must outgrow the window"
            ref_tokens, ref_logits = reference_greedy(reference, req, STEPS)
            assert tokens == ref_tokens, f"{fmt}/{kind}: greedy tokens differ"
            errs = [float((a - b).abs().max() / b.abs().max()) for a, b in zip(seen, ref_logits)]
            assert len(errs) == STEPS and max(errs) <= 1e-4, f"{fmt}/{kind}: {max(errs):.2e}"


def batch_prompts(images) -> list:
    return [STORY, ("what is in this picture?", images[0]), "Hi",
            (f"{IMAGE_TOKEN}\n{IMAGE_TOKEN}\nand these?", [images[1], images[2]]),
            STORY + " Then it went on, and on, for a while."]


@pytest.mark.parametrize("setting", ["batch", "chunked", "preempted"])
def test_batch_matches_transformers(ckpts, reference, images, setting):
    new = 12
    gen = GenerationConfig(max_new_tokens=new, min_new_tokens=new)
    kw = {}
    if setting == "chunked":
        kw = dict(max_prefill_token_num=40)
    if setting == "preempted":
        with pipeline(ckpts["original"], backend_config=engine("")) as pipe:
            lengths = [pipe.prepare_sync(p).input_token_len for p in batch_prompts(images)]
        kw = dict(num_gpu_blocks=sum(math.ceil(n / 16) for n in lengths) + 2)
    with pipeline(ckpts["original"], backend_config=engine("", **kw)) as pipe:
        prompts = batch_prompts(images)
        responses = pipe(prompts, gen_config=gen)
        for prompt, resp in zip(prompts, responses, strict=True):
            req = pipe.prepare_sync(prompt, gen)
            assert resp.token_ids == reference_greedy(reference, req, new)[0], resp.index
        preemptions = pipe.engine.core.scheduler.num_preemptions
    assert (preemptions > 0) == (setting == "preempted")


def test_mlp_matches_transformers():
    """Router (top-k, softmax over the k logits), interleaved gate/up, clamps and biases: weights
    of std 1 push gate and up past the limit of 7."""
    cfg = GptOssConfig(hidden_size=32, intermediate_size=12, num_local_experts=6,
                       num_experts_per_tok=3, num_hidden_layers=1)
    theirs = TheirMLP(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    text = ModelConfig.from_dict({
        "llm_config": {"architectures": ["GptOssForCausalLM"], "hidden_size": 32,
                       "intermediate_size": 12, "num_local_experts": 6, "num_experts_per_tok": 3,
                       "num_hidden_layers": 1, "num_attention_heads": 4, "head_dim": 8,
                       "num_key_value_heads": 2, "vocab_size": 10},
        "vision_config": {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
                          "intermediate_size": 8}}).text
    ours = GptOssMLP(text)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(1, 9, 32, generator=gen)
    with torch.no_grad():
        gate_up = x[0] @ theirs.experts.gate_up_proj[0]
        assert gate_up.abs().max() > 7  # the clamps matter
        torch.testing.assert_close(ours(x[0]), theirs(x)[0][0], atol=1e-4, rtol=1e-5)
