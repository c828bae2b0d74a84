"""GPT-OSS (InternVL3.5-GPT-OSS-20B-A4B) against transformers' InternVLForConditionalGeneration
with its GPT-OSS text model, on the same tiny random weights (fp32, CPU), through the real
pipeline: last-token logits within 1e-4 relative and identical greedy tokens in both checkpoint
layouts, for prompts longer than the sliding window (8 here), in a batch, with chunked prefill and
with preemption. The MoE pieces (router, clamped SwiGLU experts) are checked against
transformers' modules with weights large enough to reach the clamps: through the fused ops'
references (bit for bit per expert), and through their Triton kernels (the GPU's path, here in
Triton's interpreter) with the idle experts' weights NaN. On CUDA the model runs with CUDA
graphs, whose memory the plan sets aside.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from transformers import GptOssConfig, InternVLForConditionalGeneration
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP as TheirMLP

from vlmdeploy import GenerationConfig, PytorchEngineConfig, kernels, pipeline
from vlmdeploy.config import ModelConfig
from vlmdeploy.engine import EngineConfig, memory
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


def tiny_mlps(seed: int = 0) -> tuple[TheirMLP, GptOssMLP]:
    """transformers' GptOssMLP and ours with the same weights of std 1 (6 experts top-3 of width
    12 over hidden 32), which push gate and up past the limit of 7."""
    cfg = GptOssConfig(hidden_size=32, intermediate_size=12, num_local_experts=6,
                       num_experts_per_tok=3, num_hidden_layers=1)
    theirs = TheirMLP(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
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
    return theirs, ours


def test_mlp_matches_transformers():
    """Router (top-k, softmax over the k logits), interleaved gate/up, clamps and biases."""
    theirs, ours = tiny_mlps()
    x = torch.randn(1, 9, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        gate_up = x[0] @ theirs.experts.gate_up_proj[0]
        assert gate_up.abs().max() > 7  # the clamps matter
        torch.testing.assert_close(ours(x[0]), theirs(x)[0][0], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_are_transformers_bit_for_bit(dtype):
    """One expert per token, weight 1: the fused op's reference gives each expert's output
    exactly as transformers' GptOssExperts computes it (the same ops in the same order)."""
    theirs, ours = (m.to(dtype) for m in tiny_mlps())
    x = torch.randn(11, 32, generator=torch.Generator().manual_seed(2)).to(dtype)
    ids = torch.tensor([0, 3, 3, 5, 1, 0, 2, 4, 4, 4, 1])[:, None]
    ones = torch.ones(11, 1, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(ours.experts(x, ones, ids), theirs.experts(x, ids, ones))


def test_the_mlp_runs_the_fused_ops(monkeypatch):
    """The router and the experts are one call each of the fused ops, with GPT-OSS's switches."""
    calls = []

    def spy(name):
        real = getattr(kernels, name)
        return lambda *a, **kw: calls.append((name, kw)) or real(*a, **kw)

    for name in ("moe_route", "fused_moe"):
        monkeypatch.setattr(kernels, name, spy(name))
    _, ours = tiny_mlps()
    with torch.no_grad():
        ours(torch.randn(5, 32))
    assert [name for name, _ in calls] == ["moe_route", "fused_moe"]
    assert calls[0][1]["topk_then_softmax"]
    moe = calls[1][1]
    assert moe["interleaved"] and moe["activation"].limit == 7.0
    assert moe["gate_up_bias"] is not None and moe["down_bias"] is not None  # one rank: rank 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton's interpreter, on CPU machines")
@pytest.mark.parametrize("tokens", [1, 9])
def test_mlp_through_the_triton_kernels_matches_transformers(monkeypatch, tokens):
    """The path a GPU runs — the route and fused-MoE Triton kernels (here in Triton's
    interpreter) — gives transformers' output, and at one token reads only the 3 chosen
    experts: the other 3 hold NaN in every weight and bias."""
    pytest.importorskip("triton")
    from vlmdeploy.kernels.fused_moe_kernel import fused_moe_triton
    from vlmdeploy.kernels.moe_route_kernel import moe_route_triton

    theirs, ours = tiny_mlps(seed=3)
    x = torch.randn(tokens, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = theirs(x[None])[0][0]
        if tokens == 1:
            chosen = theirs.router(x)[2].flatten()
            idle = torch.ones(6, dtype=torch.bool)
            idle[chosen] = False
            for p in ours.experts.parameters():
                p[idle] = float("nan")
        monkeypatch.setattr(kernels, "moe_route", moe_route_triton)
        monkeypatch.setattr(kernels, "fused_moe", fused_moe_triton)
        got = ours(x)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_cuda_graphs_are_on_and_their_pool_is_reserved(ckpts, monkeypatch):
    """On CUDA GPT-OSS runs with CUDA graphs unless ``eager_mode``, and the KV cache is sized
    from what is left after the graphs' pool (config level: no GPU needed)."""
    model = ModelConfig.from_pretrained(ckpts["hf"])
    assert model.text.is_gpt_oss

    def config(eager: bool) -> EngineConfig:
        cpu = EngineConfig.build(PytorchEngineConfig(device_type="cpu", eager_mode=eager), model,
                                 ckpts["hf"], image_token_id=7)
        return dataclasses.replace(cpu, device=torch.device("cuda", 0))

    graphs, eager = config(False), config(True)
    assert graphs.use_cuda_graphs and not eager.use_cuda_graphs
    free = 64 << 30
    monkeypatch.setattr(memory, "activation_peak", lambda model, cfg: 1 << 30)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free, 80 << 30))
    assert memory.plan_num_blocks(None, graphs) == memory.blocks_in(
        graphs, free - (1 << 30) - graphs.graph_pool_reserve)
    assert memory.plan_num_blocks(None, eager) == memory.blocks_in(eager, free - (1 << 30))


@pytest.mark.gpu
def test_triton_and_graphs_match_reference_path_gpu(tmp_path, monkeypatch):
    """Two layers (sliding, full) of the 20B-A4B's shape (32 experts top-4, bf16): Triton kernels
    with CUDA-graph decode and prefill give the reference path's greedy tokens, but where the
    reference's own top-2 margin is within bf16 rounding. The image prompt outgrows the window
    of 128."""
    from tests.models.test_fast_path_gpu import BF16_TIE, _image, _run, divergences

    monkeypatch.setenv("VLMDEPLOY_KERNELS", "triton")  # (_run sets it; restored after)

    path = str(make_checkpoint(tmp_path / "gpt-oss", "gpt-oss-20b", "hf", seed=0,
                               dtype=torch.bfloat16, device="cuda",
                               text_overrides={"num_hidden_layers": 2}))
    prompts = [STORY, ("describe this image", _image(800, 500, 3)), "Hi"]
    gen = GenerationConfig(max_new_tokens=24, min_new_tokens=24, logprobs=2)
    fast, fast_ms = _run(path, False, prompts, gen)
    ref, ref_ms = _run(path, True, prompts, gen)
    report = divergences(fast, ref)
    print(f"\n{report}; batch-1 step: fast {fast_ms:.2f} ms, reference eager {ref_ms:.2f} ms")
    assert all(i == 24 or margin <= BF16_TIE for i, margin in report), report
