"""The trained model on disk: loading and saving its weights, and evaluating the saved model.

Contract: the weights are stored as the original InternVL3.5 checkpoints store them (original
parameter names, bf16 safetensors, ``reference.hf_to_original``), which is what the engine loads;
training itself uses transformers' ``InternVLForConditionalGeneration`` and its names.
``load_original_weights`` is the inverse and may grow the language model (``--text-layers`` over
``--init-from``). ``evaluate_saved`` scores the files written to the model directory, not the
in-memory model: what it reports is what was shipped, bf16 rounding included.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import torch

from vlmdeploy.synthetic.eval import evaluate
from vlmdeploy.synthetic.questions import KINDS, generate_questions
from vlmdeploy.synthetic.reference import ReferenceAnswerer, hf_to_original, original_to_hf

EVAL_SEED = 1000  # held-out question stream of the reported evaluation


def load_original_weights(model: torch.nn.Module, model_dir: Path) -> None:
    """Load a saved model into ``model``. A language model deeper than the saved one keeps the
    saved layers and starts each extra layer as the identity (its output projections zeroed), so
    growing the model keeps what it has learnt."""
    from safetensors.torch import load_file

    state = original_to_hf(load_file(str(model_dir / "model.safetensors")))
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()},
                                                strict=False)
    new_layer = re.compile(r"^model\.language_model\.layers\.(\d+)\.")
    if unexpected or any(not new_layer.match(k) for k in missing):
        raise ValueError(f"{model_dir} does not fit: missing {missing}, unexpected {unexpected}")
    layers = model.model.language_model.layers
    for index in sorted({int(new_layer.match(k)[1]) for k in missing}):
        with torch.no_grad():
            layers[index].self_attn.o_proj.weight.zero_()
            layers[index].mlp.down_proj.weight.zero_()
        print(f"language-model layer {index} added as the identity", flush=True)


def save_weights(model: torch.nn.Module, out: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu", torch.bfloat16).contiguous()
             for k, v in model.state_dict().items()}
    original = hf_to_original(state)
    save_file(dict(sorted(original.items())), str(out / "model.safetensors"),
              metadata={"format": "pt"})


def evaluate_saved(model_dir: Path, device: str, n: int) -> tuple[dict[str, Any], list[Any]]:
    """Greedy exact-answer accuracy of the model saved in ``model_dir`` on the first ``n``
    questions of the held-out stream (seed ``EVAL_SEED``; prints the summary): the ``eval`` entry
    of ``train_log.json`` and up to 40 failures as ``(kind, answer, prediction)``."""
    answerer = ReferenceAnswerer(model_dir, device=device)
    t = time.time()
    report = evaluate(answerer, generate_questions(EVAL_SEED, n))
    print(report.summary(), flush=True)
    result = {"seed": EVAL_SEED, "n": report.n, "seconds": round(time.time() - t, 1),
              "overall": report.accuracy(),
              **{k: report.accuracy(k) for k in KINDS if k in report.total}}
    return result, [(q.kind, q.answer, pred) for q, pred in report.failures[:40]]
