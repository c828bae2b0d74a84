"""The requests of the engine workloads (DESIGN §5) and the checkpoint they run on.

Prompts are OpenAI-style messages whose images are base64 ``data:image/jpeg`` URLs of random
pixels, so decoding and tiling happen inside the timed region, as in the reference harness; texts
are random words cut to a token count. A seed gives each run its own images and texts: a repeated
prompt would be served from the prefix and embedding caches.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import torch
from PIL import Image

from vlmdeploy import GenerationConfig

VOCAB = (
    "image picture scene shape colour light dark left right top bottom centre object person "
    "street river table window garden bright small large round square describe detail show "
    "the a of and to in is with on for that this"
).split()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def text_of(tokenizer, n_tokens: int, rng: np.random.Generator) -> str:
    """Random words that tokenize to ``n_tokens`` tokens (approximately, never more)."""
    words: list[str] = []
    # Grow by half the tokens still missing (a word is at least one token), then keep the
    # longest prefix within n_tokens, found by bisection: a few encodes per text, not one a word.
    while (have := len(tokenizer.encode(" ".join(words)))) < n_tokens:
        more = max(1, (n_tokens - have) // 2)
        words.extend(VOCAB[i] for i in rng.integers(len(VOCAB), size=more))
    lo, hi = 0, len(words)  # words[:lo] fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(tokenizer.encode(" ".join(words[:mid]))) <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])


def jpeg_url(side: int, rng: np.random.Generator) -> str:
    return jpeg_url_of((side, side), rng)


def jpeg_url_of(size: tuple[int, int], rng: np.random.Generator) -> str:
    """A ``data:`` URL of a (width, height) JPEG of random pixels."""
    width, height = size
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(
        buf, "JPEG", quality=75
    )
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def request(url: str, text: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": text},
            ],
        }
    ]


def workload(tok, n: int, side: int, n_text: int, seed: int) -> list[list[dict]]:
    rng = np.random.default_rng(seed)
    return [request(jpeg_url(side, rng), text_of(tok, n_text, rng)) for _ in range(n)]


def gen(n_out: int) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n_out, ignore_eos=True)


def shape_name(preset: str) -> str:
    """A preset's name in the results history ("8b" -> "InternVL3.5-8B")."""
    return f"InternVL3.5-{preset.upper() if preset[:1].isdigit() else preset}"


def model_source(model: str | None, preset: str | None, load_format: str = "auto",
                 model_format: str | None = None) -> tuple[str, str]:
    """The checkpoint to load and its load format: ``model`` as given, or for ``preset`` a
    config-and-tokenizer checkpoint of that size (written once under /tmp) with dummy weights.
    With ``model_format='awq'`` the preset's config says AWQ (an AWQ model is a kind of
    checkpoint, not a switch on a full-precision one): its dummy weights are rounded to 4 bits."""
    if not preset:
        return model, load_format
    from vlmdeploy.testing.checkpoint import make_checkpoint

    awq = model_format == "awq"
    path = make_checkpoint(f"/tmp/vlmdeploy-bench-{preset}{'-awq' if awq else ''}", preset, "hf",
                           dtype=torch.bfloat16, weights=False)
    if awq:
        from vlmdeploy.testing.quantize import quantization_config

        config = json.loads((path / "config.json").read_text())
        config["quantization_config"] = quantization_config("awq")
        (path / "config.json").write_text(json.dumps(config, indent=2))
    return str(path), "dummy"
