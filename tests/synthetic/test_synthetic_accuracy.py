"""The shipped default model answers held-out questions, via transformers and via our engine.

The model card's accuracy was measured on 300 questions of seed 1000. CI draws a smaller sample
from another held-out seed and requires at least ``min_correct(n, p, alpha)`` right answers: fewer
would mean, at error rate alpha, that the accuracy is below p. p is the measured overall accuracy,
so the test catches a model that regressed, not noise.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import vlmdeploy
from vlmdeploy.synthetic.eval import EvalReport, min_correct
from vlmdeploy.synthetic.questions import generate_questions
from vlmdeploy.synthetic.reference import ReferenceAnswerer

MODEL_DIR = Path(vlmdeploy.__file__).parent / "assets" / "internvl3_5-shapes-tiny"
CI_SEED = 2000  # held out: training used seed 0, the model card's evaluation seed 1000
MEASURED_OVERALL = 290 / 300  # the model card's transformers number (seed 1000, n = 300)
ALPHA = 1e-3


@pytest.fixture(scope="module")
def questions():
    return generate_questions(CI_SEED, 50)  # the issue asks for agreement on 50 questions


@pytest.fixture(scope="module")
def reference_answers(questions) -> list[str]:
    answerer = ReferenceAnswerer(MODEL_DIR)
    return [answerer(q.messages) for q in questions]


@pytest.mark.slow
def test_transformers_accuracy_is_at_the_measured_level(questions, reference_answers):
    report = EvalReport()
    for q, pred in zip(questions, reference_answers, strict=True):
        report.add(q, pred)
    bound = min_correct(report.n, MEASURED_OVERALL, ALPHA)
    assert report.n_correct >= bound, report.summary()


@pytest.mark.slow
def test_engine_gives_the_same_greedy_answers_as_transformers(questions, reference_answers,
                                                              embedded_answers):
    """The public pipeline's greedy answers (32 new tokens at most) are transformers', word for
    word (``embedded_answers``: the pipeline's, shared with the other tests that need them)."""
    assert embedded_answers(questions) == reference_answers


def test_default_model_is_found_by_name():
    from vlmdeploy.assets import DEFAULT_MODEL_NAME, resolve_model_path, sample_image_path

    assert Path(resolve_model_path(None)) == MODEL_DIR
    assert Path(resolve_model_path(DEFAULT_MODEL_NAME)) == MODEL_DIR
    assert sample_image_path().is_file()


MULTI_SEED = 3000  # held out as well, for the two kinds with their own targets
MULTI_KINDS = ("multi_image", "multi_turn")
N_MULTI = 40  # questions of each kind
TARGET_MULTI = 0.90  # the multi-image and multi-turn targets


@pytest.mark.slow
def test_multi_image_and_multi_turn_answers_through_the_pipeline(questions, embedded_answers):
    """40 questions of each kind through the public pipeline API (the CI sample's 8, then more of
    MULTI_SEED): fewer right than the bound would mean, at error rate ALPHA, an accuracy below the
    90% target (the model card measured 100% and 96% on 50 of each)."""
    multi = [q for q in questions if q.kind in MULTI_KINDS]
    multi += generate_questions(MULTI_SEED, 2 * N_MULTI - len(multi), kinds=MULTI_KINDS)
    report = EvalReport()
    for q, text in zip(multi, embedded_answers(multi), strict=True):
        report.add(q, text)
    for kind in MULTI_KINDS:
        assert report.total[kind] == N_MULTI
        assert report.correct[kind] >= min_correct(N_MULTI, TARGET_MULTI, ALPHA), report.summary()


@pytest.mark.slow
def test_readme_main_command_describes_the_sample_image_right():
    """The README's first command (after setup) prints the sample image's true description: the
    image is the generator's scene ``sample/25`` and the answer is derived from that scene."""
    import random
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    from vlmdeploy.assets import sample_image_path
    from vlmdeploy.synthetic.questions import describe
    from vlmdeploy.synthetic.scene import render, sample_scene

    scene = sample_scene(random.Random("sample/25"), n_objects=3, size=(640, 480))
    shipped = np.asarray(Image.open(sample_image_path()).convert("RGB"))
    assert np.array_equal(shipped, np.asarray(render(scene).convert("RGB")))
    import os

    root = Path(__file__).resolve().parents[2]
    path = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    out = subprocess.run([sys.executable, str(root / "examples" / "hello_world.py")], env=env,
                         capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip().splitlines()[-1] == describe(scene)
