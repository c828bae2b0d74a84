"""The shipped default model with quantised weights still answers its held-out questions through
the public pipeline.

On the model card's 300 questions (seed 1000) the unquantised engine (fp32 on the CPU) and FP8
quantised on load both answer 290 right, with the same answer to every question, and an AWQ
checkpoint written by ``vlmdeploy.testing.quantize`` (4-bit, rounded to nearest, no calibration)
289, differing on one question. CI compares on a
smaller sample of another held-out seed: FP8 must give the unquantised engine's greedy answer to
all questions but at most one (a paired test, much tighter than comparing two accuracies), and
AWQ at least ``min_correct(n, p, alpha)`` right answers for its measured accuracy p. The sample is
the first questions of tests/synthetic's CI seed, whose unquantised answers the session shares.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import vlmdeploy
from vlmdeploy import GenerationConfig, PytorchEngineConfig, pipeline
from vlmdeploy.synthetic.eval import EvalReport, min_correct
from vlmdeploy.synthetic.questions import generate_questions
from vlmdeploy.testing.quantize import quantize_checkpoint

MODEL_DIR = Path(vlmdeploy.__file__).parent / "assets" / "internvl3_5-shapes-tiny"
SEED = 2000  # held out: training used seed 0, the model card seed 1000; the CI seed
N = 24
AWQ_MEASURED = 289 / 300
ALPHA = 1e-3


@pytest.fixture(scope="module")
def questions():
    return generate_questions(SEED, N)


def answers(path: str | Path, model_format: str | None, questions) -> list[str]:
    config = PytorchEngineConfig(model_format=model_format)
    with pipeline(str(path), backend_config=config) as pipe:
        responses = pipe([q.messages for q in questions],
                         gen_config=GenerationConfig(max_new_tokens=32))
    return [r.text for r in responses]


def report(questions, texts: list[str]) -> EvalReport:
    out = EvalReport()
    for q, text in zip(questions, texts, strict=True):
        out.add(q, text)
    return out


@pytest.mark.slow
def test_fp8_gives_the_unquantised_answers(questions, embedded_answers):
    plain = embedded_answers(questions)
    fp8 = answers(MODEL_DIR, "fp8", questions)
    differ = [(q.answer, a, b) for q, a, b in zip(questions, plain, fp8, strict=True) if a != b]
    assert len(differ) <= 1, differ
    assert report(questions, fp8).n_correct >= report(questions, plain).n_correct - 1


@pytest.mark.slow
def test_an_awq_checkpoint_made_by_the_tool_answers(questions, tmp_path):
    path = quantize_checkpoint(MODEL_DIR, tmp_path / "awq", "awq")
    result = report(questions, answers(path, None, questions))
    assert result.n_correct >= min_correct(N, AWQ_MEASURED, ALPHA), result.summary()
