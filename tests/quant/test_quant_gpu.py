"""Quantised weights on the GPU: at the 1B shape (bf16, random weights) the Triton kernels with
CUDA graphs — FP8 through each GEMM backend, AWQ — give the PyTorch reference path's greedy
tokens; the embedded default model with FP8 (each backend) and AWQ answers its held-out
questions as the unquantised engine does; and each one's decode step time is printed."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

import vlmdeploy
from tests.models.test_fast_path_gpu import divergences
from vlmdeploy import GenerationConfig, PytorchEngineConfig, pipeline
from vlmdeploy.synthetic.questions import generate_questions
from vlmdeploy.testing.quantize import quantize_checkpoint

pytestmark = pytest.mark.gpu
MODEL_DIR = Path(vlmdeploy.__file__).parent / "assets" / "internvl3_5-shapes-tiny"


def greedy(path: str, model_format: str | None, monkeypatch, reference: bool) -> list:
    """Greedy tokens and top-2 logprobs of three prompts: the Triton kernels with CUDA graphs, or
    the PyTorch reference path in eager mode."""
    monkeypatch.setenv("VLMDEPLOY_KERNELS", "reference" if reference else "triton")
    config = PytorchEngineConfig(model_format=model_format, session_len=4096, max_batch_size=16,
                                 eager_mode=reference)
    prompts = ["Tell me about the sea. " * 20, "Hi", "Count to ten."]  # a long prefill: the GEMM
    gen = GenerationConfig(max_new_tokens=24, min_new_tokens=24, logprobs=2)
    with pipeline(path, backend_config=config) as pipe:
        return [(r.token_ids, r.logprobs) for r in pipe(prompts, gen_config=gen)]


@pytest.mark.parametrize("fmt,fp8_gemm", [("fp8", "triton"), ("fp8", "scaled_mm"),
                                          ("awq", "triton")])
def test_quantised_triton_path_matches_the_reference_path(ckpt_1b, tmp_path, monkeypatch, fmt,
                                                          fp8_gemm):
    """1B shape, bf16: batched prefill (the GEMMs), decode of three rows (the row path) and of one
    (the W4A16 GEMV), captured in graphs."""
    if fp8_gemm == "scaled_mm" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("cuBLAS's blockwise FP8 GEMM needs Hopper")
    monkeypatch.setenv("VLMDEPLOY_FP8_GEMM", fp8_gemm)
    path, model_format = ckpt_1b("original"), "fp8"
    if fmt == "awq":
        path = str(quantize_checkpoint(path, tmp_path / "awq", "awq", device="cuda"))
        model_format = None
    fast = greedy(path, model_format, monkeypatch, reference=False)
    ref = greedy(path, model_format, monkeypatch, reference=True)
    report = divergences(fast, ref)
    print(f"\n{fmt} ({fp8_gemm}): (first differing token, reference top-2 margin) {report}")
    # a divergence is acceptable only where the reference itself is within rounding
    assert all(i == 24 or margin < 0.05 for i, margin in report), report


def answers(path, model_format, questions) -> tuple[list[str], float]:
    config = PytorchEngineConfig(model_format=model_format, session_len=4096)
    with pipeline(str(path), backend_config=config) as pipe:
        texts = [r.text for r in pipe([q.messages for q in questions],
                                      gen_config=GenerationConfig(max_new_tokens=32))]
        pipe("warm up", gen_config=GenerationConfig(max_new_tokens=4))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        pipe("time the decode", gen_config=GenerationConfig(max_new_tokens=64,
                                                             min_new_tokens=64))
        step_ms = (time.perf_counter() - t0) / 64 * 1e3
    return texts, step_ms


def test_engine_answers_alike_with_every_format(tmp_path, monkeypatch):
    questions = generate_questions(4000, 100)
    plain, plain_ms = answers(MODEL_DIR, None, questions)
    awq_path = quantize_checkpoint(MODEL_DIR, tmp_path / "awq", "awq")
    runs = {}
    for name, path, fmt, gemm in [("fp8 triton", MODEL_DIR, "fp8", "triton"),
                                  ("fp8 scaled_mm", MODEL_DIR, "fp8", "scaled_mm"),
                                  ("awq", awq_path, None, "triton")]:
        if gemm == "scaled_mm" and torch.cuda.get_device_capability() < (9, 0):
            continue
        monkeypatch.setenv("VLMDEPLOY_FP8_GEMM", gemm)
        runs[name] = answers(path, fmt, questions)
    print(f"\nbatch-1 decode step (embedded model): bf16 {plain_ms:.2f} ms, " + ", ".join(
        f"{name} {ms:.2f} ms" for name, (_, ms) in runs.items()))
    for name, (texts, _) in runs.items():
        same = sum(a == b for a, b in zip(texts, plain, strict=True))
        assert same >= 97, f"{name}: {same}/100 answers as bf16"
