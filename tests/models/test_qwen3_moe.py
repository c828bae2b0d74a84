"""Qwen3-MoE (InternVL3.5-30B-A3B's language model) against transformers'
InternVLForConditionalGeneration with a ``qwen3_moe`` text config, on the tiny-moe preset (8
experts top-2, layer 1 dense through ``mlp_only_layers``), fp32 on the CPU.

The bar is the dense model's: last-token logits within 1e-4 relative at prefill and every greedy
step, identical greedy tokens — for each checkpoint layout (experts per expert or fused in 3-D),
one prompt at a time and as a batch whose answers outgrow a small KV cache (preemption). Decode
steps take the row path (attention through ``linear_row``, the experts through ``fused_moe``),
prefills the general one. The loader reads every layout into the same parameters.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import InternVLForConditionalGeneration

from tests.models.test_vs_transformers import prompts, reference_greedy, rel_err, run_ours
from vlmdeploy import GenerationConfig, PytorchEngineConfig, pipeline
from vlmdeploy.config import ModelConfig
from vlmdeploy.layers.moe import SparseMoeBlock
from vlmdeploy.models import fast_paths
from vlmdeploy.models.build import build_model
from vlmdeploy.models.internvl import InternVLForCausalLM
from vlmdeploy.models.loader import WeightLoadError, load_weights
from vlmdeploy.testing.checkpoint import make_checkpoint
from vlmdeploy.vl.tiling import as_pixel_values

STEPS = 24
LAYOUTS = {  # name: (format, experts fused in 3-D)
    "original": ("original", False),
    "original-fused": ("original", True),
    "hf": ("hf", False),
    "hf-fused": ("hf", True),
    "hf-legacy": ("hf-legacy", False),
}


@pytest.fixture(scope="module")
def moe_ckpts(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("moe")
    return {
        name: str(make_checkpoint(root / name, "tiny-moe", fmt, seed=0, fused_experts=fused))
        for name, (fmt, fused) in LAYOUTS.items()
    }


@pytest.fixture(scope="module")
def hf_model(moe_ckpts):
    return InternVLForConditionalGeneration.from_pretrained(
        moe_ckpts["hf"], dtype=torch.float32
    ).eval()


def _build(path: str) -> InternVLForCausalLM:
    return build_model(path, ModelConfig.from_pretrained(path), torch.float32, torch.device("cpu"))


def test_the_model_has_sparse_and_dense_layers(moe_ckpts, hf_model):
    model = _build(moe_ckpts["hf"])
    ours = [isinstance(layer.mlp, SparseMoeBlock) for layer in model.language_model.model.layers]
    theirs = [
        type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock"
        for layer in hf_model.model.language_model.layers
    ]
    assert ours == theirs == [True, False, True]
    assert type(model.language_model.model) is fast_paths.RowPathQwen3MoeModel
    experts = model.language_model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape == (8, 2 * 48, 64) and experts.down_proj.shape == (8, 64, 48)


def test_every_layout_loads_the_same_weights(moe_ckpts):
    params = {name: dict(_build(path).named_parameters()) for name, path in moe_ckpts.items()}
    ref = params.pop("hf")
    for name, got in params.items():
        assert got.keys() == ref.keys(), name
        for key in ref:
            assert torch.equal(got[key], ref[key]), f"{name}: {key}"


def test_a_missing_or_doubled_expert_is_an_error(moe_ckpts, tmp_path):
    path = moe_ckpts["hf"]
    cfg = ModelConfig.from_pretrained(path)
    tensors = load_file(f"{path}/model.safetensors")
    gone = "model.language_model.layers.2.mlp.experts.5.up_proj.weight"
    save_file({k: v for k, v in tensors.items() if k != gone}, str(tmp_path / "model.safetensors"))
    with torch.device("meta"):
        model = InternVLForCausalLM(cfg)
    model = model.to_empty(device="cpu")
    with pytest.raises(WeightLoadError, match=r"layers\.2\.mlp\.experts\.gate_up_proj\[expert 5"):
        load_weights(model, tmp_path)
    fused = load_file(f"{moe_ckpts['hf-fused']}/model.safetensors")
    key = "model.language_model.layers.0.mlp.experts.down_proj"
    save_file({**tensors, key: fused[key]}, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightLoadError, match="a second time"):
        load_weights(model, tmp_path)


@pytest.mark.parametrize("ours", ["original", "hf-fused"])
def test_logits_and_tokens_match_transformers(moe_ckpts, hf_model, images, ours):
    pipe = pipeline(
        moe_ckpts[ours], backend_config=PytorchEngineConfig(session_len=8192, block_size=16)
    )
    try:
        for kind, prompt in prompts(images).items():
            req, tokens, logits = run_ours(pipe, prompt, STEPS)
            tiles = [as_pixel_values(im.pixel_values) for im in req.images]
            pixels = torch.cat(tiles) if tiles else None
            ref_tokens, ref_logits = reference_greedy(hf_model, req.token_ids, pixels, STEPS)
            assert tokens == ref_tokens, f"{ours}/{kind}: greedy tokens differ"
            errs = [rel_err(a, b) for a, b in zip(logits, ref_logits, strict=True)]
            assert max(errs) <= 1e-4, f"{ours}/{kind}: max relative logit error {max(errs):.2e}"
    finally:
        pipe.close()


def test_a_preempted_batch_matches_transformers(moe_ckpts, hf_model, images):
    """Four requests in one batch on 40 blocks of 16 tokens: their answers outgrow the cache, so
    the scheduler preempts and recomputes; every answer is still transformers' greedy one."""
    batch = [
        ("describe this image", images[0]),
        "Tell me a story about a tiny model.",
        "Count from one to ten, slowly.",
        ("what is in this picture?", images[0]),
    ]
    config = PytorchEngineConfig(device_type="cpu", block_size=16, num_gpu_blocks=40,
                                 max_batch_size=4, session_len=1024)  # fmt: skip
    gen = GenerationConfig(max_new_tokens=STEPS, do_sample=False, ignore_eos=True)
    with pipeline(moe_ckpts["hf"], backend_config=config, log_level="WARNING") as pipe:
        reqs = [pipe.prepare_sync(p, gen) for p in batch]  # (before the images are cached)
        outs = pipe(batch, gen_config=gen)
        preemptions = pipe.engine.stats()["num_preemptions"]
    assert preemptions > 0
    for prompt, req, out in zip(batch, reqs, outs, strict=True):
        tiles = [as_pixel_values(im.pixel_values) for im in req.images]
        pixels = torch.cat(tiles) if tiles else None
        ref_tokens, _ = reference_greedy(hf_model, req.token_ids, pixels, STEPS)
        assert out.token_ids == ref_tokens, prompt


def test_a_checkpoint_transformers_saves_loads_the_same_weights(moe_ckpts, hf_model, tmp_path):
    """transformers 5 saves Qwen3-MoE's experts fused (``mlp.experts.gate_up_proj``) with its own
    config.json (``rope_parameters``, its defaults written out)."""
    hf_model.save_pretrained(tmp_path)
    saved = dict(_build(str(tmp_path)).named_parameters())
    ours = dict(_build(moe_ckpts["hf"]).named_parameters())
    assert saved.keys() == ours.keys()
    for key in ours:
        assert torch.equal(saved[key], ours[key]), key


def test_dummy_weights_fill_the_experts(moe_ckpts):
    path = moe_ckpts["hf"]
    model = build_model(path, ModelConfig.from_pretrained(path), torch.float32,
                        torch.device("cpu"), load_format="dummy")  # fmt: skip
    experts = model.language_model.model.layers[2].mlp.experts
    for p in (experts.gate_up_proj, experts.down_proj):
        assert torch.isfinite(p).all() and 0.015 < float(p.std()) < 0.025


@pytest.mark.gpu
def test_triton_and_graphs_match_reference_path_gpu(tmp_path):
    """Two layers of the 30B-A3B shape (128 experts top-8, bf16): Triton kernels + CUDA-graph
    decode give the reference path's greedy tokens, but where the reference's own top-2 margin
    is within bf16 rounding."""
    from tests.models.test_fast_path_gpu import BF16_TIE, _image, _run, divergences

    path = str(make_checkpoint(tmp_path / "moe", "30b-a3b", "hf", seed=0, dtype=torch.bfloat16,
                               device="cuda", text_overrides={"num_hidden_layers": 2}))
    prompts = ["Tell me about the sea.", ("describe this image", _image(800, 500, 3)), "Hi"]
    gen = GenerationConfig(max_new_tokens=24, min_new_tokens=24, logprobs=2)
    fast, fast_ms = _run(path, False, prompts, gen)
    ref, ref_ms = _run(path, True, prompts, gen)
    report = divergences(fast, ref)
    print(f"\n{report}; batch-1 step: fast {fast_ms:.2f} ms, reference eager {ref_ms:.2f} ms")
    assert all(i == 24 or margin <= BF16_TIE for i, margin in report), report
