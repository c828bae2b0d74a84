"""Shared fixtures: tiny random checkpoints (written once per test session), test images, and the
embedded default model's answers to generated questions (each answered once per session)."""

from __future__ import annotations

import hashlib
import os
import shutil

# Triton reads TRITON_INTERPRET once, so it must be set before anything (transformers included)
# imports
# it: on machines without a GPU the kernel tests run in Triton's CPU interpreter.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from vlmdeploy.testing.checkpoint import make_checkpoint  # noqa: E402

torch.set_num_threads(2)

# Proxies of the machine running the tests would reroute the local test servers' traffic: the
# suite runs without them (tests of proxy support set their own).
for _name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
    os.environ.pop(_name, None)
    os.environ.pop(_name.upper(), None)


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory) -> dict[str, str]:
    """The same seeded tiny weights in every layout: original, -HF, legacy -HF; plus an
    InternViT-6B-style tower (RMSNorm, qk-norm, no qkv bias) in original and -HF layouts."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name, preset, fmt in [
        ("original", "tiny", "original"),
        ("hf", "tiny", "hf"),
        ("hf-legacy", "tiny", "hf-legacy"),
        ("6b-original", "tiny-6b", "original"),
        ("6b-hf", "tiny-6b", "hf"),
    ]:
        out[name] = str(make_checkpoint(root / name, preset, fmt, seed=0))
    return out


@pytest.fixture(scope="session")
def ckpt_1b(tmp_path_factory):
    """``ckpt_1b(fmt)``: the 1B shape with seed-0 random bf16 weights in layout ``fmt``
    ('original' or 'hf'), about 2 GB, written on first use and reused after."""
    made: dict[str, str] = {}

    def get(fmt: str) -> str:
        if fmt not in made:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            out = tmp_path_factory.mktemp(f"1b-{fmt}")
            made[fmt] = str(
                make_checkpoint(out, "1b", fmt, seed=0, dtype=torch.bfloat16, device=device)
            )
        return made[fmt]

    return get


def solid_image(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (h // 8 + 1, w // 8 + 1, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(arr.numpy()).resize((w, h), Image.NEAREST)


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    # 1 tile (square), 2x1 grid + thumbnail, 1x3 grid + thumbnail
    return [solid_image(300, 300, 1), solid_image(600, 300, 2), solid_image(200, 640, 3)]


def _question_key(question) -> str:
    """A question's content: its roles, texts and image pixels."""
    h = hashlib.sha256()
    for m in question.messages:
        content = m["content"]
        for part in content if isinstance(content, list) else [{"type": "text", "text": content}]:
            if part["type"] == "text":
                h.update(f"{m['role']}:text:{part['text']}".encode())
            else:
                im = part["image"]
                h.update(f"{m['role']}:image:{im.mode}:{im.size}".encode())
                h.update(im.tobytes())
    return h.hexdigest()


@pytest.fixture(scope="session")
def embedded_answers():
    """``embedded_answers(questions)``: the embedded default model's greedy answers (32 new tokens
    at most) through the public pipeline, unquantised, to generated questions
    (``vlmdeploy.synthetic``). Each question is answered once per session: the tests that check
    the plain engine's answers and those that hold quantised engines to them share the work."""
    done: dict[str, str] = {}

    def answers(questions) -> list[str]:
        from vlmdeploy import GenerationConfig, pipeline
        from vlmdeploy.assets import default_model_path

        keys = [_question_key(q) for q in questions]
        todo = {k: q for k, q in zip(keys, questions, strict=True) if k not in done}
        if todo:
            with pipeline(str(default_model_path())) as pipe:
                out = pipe([q.messages for q in todo.values()],
                           gen_config=GenerationConfig(max_new_tokens=32))
            done.update(zip(todo, (r.text for r in out), strict=True))
        return [done[k] for k in keys]

    return answers
