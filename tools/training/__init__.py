"""Training the embedded default model: a tiny InternVL3.5 (InternViT + pixel shuffle + mlp1 +
Qwen3), reproducible from its command line. Run from the project root::

    python -m tools.training --out DIR --steps 2303 --warmup 300 --aux none
    python -m tools.training --out DIR2 --init-from DIR --data-offset 100000 \\
        --steps 2000 --warmup 100 --aux tokens     # a second stage on fresh questions

``python tools/train_default_model.py ARGS`` runs the same command. The model card
(``vlmdeploy/assets/internvl3_5-shapes-tiny/README.md``) lists the exact commands behind the
shipped weights.

Reproducible: the tokenizer is trained on a fixed generated corpus, the weights are initialised
after ``torch.manual_seed(seed)``, and training sample ``i`` is the pure function
``make_question(TRAIN_SEED, i, kind_of(i))`` of its index, so the data stream does not depend on the
number of loader workers. (On a GPU, floating-point reductions are not bitwise deterministic; on the
CPU a rerun is bitwise identical.)

The modules, in the order a run uses them:

- ``cli``: the arguments, and the order of a run's steps.
- ``model_files``: the tokenizer (ChatML + InternVL image tokens, byte-level BPE over the task's
  vocabulary) and ``config.json`` in the original ``InternVLChatModel`` layout.
- ``stream``: which questions training sample ``i`` asks, and in which prompt form.
- ``batches``: a sample's token ids, loss labels, tiles and dense image-token targets; collation.
- ``objectives``: the losses, on prompts rendered exactly as the engine renders them
  (``reference.render_prompt``): assistant tokens plus, optionally (``--aux``), dense targets on
  the image tokens from training-only heads.
- ``loop``: optimiser, learning-rate schedule and the training loop with its stopping rules.
- ``checkpoint``: the weights under their original names (bf16 safetensors), and the greedy
  exact-answer accuracy on held-out questions (``--eval-n``, seed ``EVAL_SEED``).

Importing this package first registers ``vlmdeploy`` and ``vlmdeploy.vl`` as bare packages (see
``_bare_packages``), which is why it must run before any module here imports from them. The names
below are re-exported for tests and interactive use.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _bare_packages() -> None:
    """Register ``vlmdeploy`` and ``vlmdeploy.vl`` as bare packages, so importing the leaf modules
    training needs (``synthetic``, ``vl.tiling``, ``vl.constants``) never runs the package
    ``__init__`` files, which import the engine: training must not depend on engine code."""
    for name, path in (("vlmdeploy", ROOT / "vlmdeploy"), ("vlmdeploy.vl", ROOT / "vlmdeploy/vl")):
        module = types.ModuleType(name)
        module.__path__ = [str(path)]
        sys.modules[name] = module


# Here rather than in a submodule: a package's __init__ runs before any of its modules, so no
# import order inside the package can reach the engine's __init__ first.
_bare_packages()

from .batches import TrainSet, collate, normalise, scene_slots, token_labels  # noqa: E402
from .checkpoint import EVAL_SEED, evaluate_saved, load_original_weights, save_weights  # noqa: E402
from .loop import lr_at, make_optimizer, train  # noqa: E402
from .model_files import (  # noqa: E402
    MAX_DYNAMIC_PATCH,
    TEXT,
    VISION,
    build_tokenizer,
    original_config,
    write_model_files,
    write_tokenizer,
)
from .objectives import AuxHeads, SummaryHead, image_features, loss_of  # noqa: E402
from .stream import (  # noqa: E402
    KIND_WEIGHTS,
    TRAIN_SEED,
    ask_absent,
    kind_of,
    parse_kind_weights,
    prompt_form,
    sample_questions,
)

__all__ = [
    "EVAL_SEED", "KIND_WEIGHTS", "MAX_DYNAMIC_PATCH", "ROOT", "TEXT", "TRAIN_SEED", "VISION",
    "AuxHeads", "SummaryHead", "TrainSet", "ask_absent", "build_tokenizer", "collate",
    "evaluate_saved", "image_features", "kind_of", "load_original_weights", "loss_of", "lr_at",
    "make_optimizer", "normalise", "original_config", "parse_kind_weights", "prompt_form",
    "sample_questions", "save_weights", "scene_slots", "token_labels", "train",
    "write_model_files", "write_tokenizer",
]
