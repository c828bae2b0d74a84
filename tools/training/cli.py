"""Train the embedded default model: a tiny InternVL3.5 (InternViT + pixel shuffle + mlp1 + Qwen3).

The command line, and the order of a run's steps: write the tokenizer and configs, seed and build
the model (or grow it from ``--init-from``), train, save the weights, evaluate the saved model and
write ``train_log.json`` (the loss log, the evaluation, the arguments and some failures).

    python -m tools.training --out DIR --steps 2303 --warmup 300 --aux none

With ``--steps 0 --time-budget S`` the number of steps is fixed after ``--calibrate`` steps
(inside the warmup, so the schedule equals that of ``--steps N`` with the N printed). See the
package's docstring (``tools/training/__init__.py``) for what makes a run reproducible.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vlmdeploy.synthetic.reference import build_hf_model

from .checkpoint import evaluate_saved, load_original_weights, save_weights
from .loop import train
from .model_files import TEXT, write_model_files
from .stream import KIND_WEIGHTS, parse_kind_weights


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    # --help's description: the first paragraph of this module's docstring.
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=0, help="0: choose from --time-budget")
    p.add_argument("--time-budget", type=float, default=300.0, help="seconds of training")
    p.add_argument("--calibrate", type=int, default=100)
    p.add_argument("--max-seconds", type=float, default=0.0, help="hard stop (0: none)")
    p.add_argument("--stop-after", type=int, default=0,
                   help="stop after this many steps of the --steps schedule (0: none)")
    p.add_argument("--batch-size", type=int, default=32, help="samples (images) per step")
    p.add_argument("--questions-per-scene", type=int, default=1,
                   help="questions trained per sample image (one vision pass for all)")
    p.add_argument("--text-layers", type=int, default=TEXT["num_hidden_layers"],
                   help="language-model depth (extra layers over --init-from start as identity)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--eval-n", type=int, default=300)
    p.add_argument("--aux", choices=("none", "tokens", "scene"), default="scene",
                   help="dense image-token targets: none; the object under each token; that and "
                        "the whole scene on whole-image tiles")
    p.add_argument("--local-targets", choices=("objects", "all-tokens"), default="objects",
                   help="objects: object-vs-background on every token, shape/colour/slot on "
                        "object tokens, slot only on whole-image tiles; all-tokens: each column "
                        "on every token, slot on crops too (how stages 1-3 were trained)")
    p.add_argument("--summary-layer", type=int, default=0,
                   help="train the language model's state at each </img> after this many layers "
                        "to hold the image's slot contents (0: off)")
    p.add_argument("--summary-weight", type=float, default=1.0)
    p.add_argument("--aux-weight", type=float, default=1.0, help="dense image-token loss weight")
    p.add_argument("--init-from", type=Path, help="start from this saved model's weights")
    p.add_argument("--data-offset", type=int, default=0, help="index of the first question")
    p.add_argument("--plain-share", type=float, default=0.0,
                   help="share of prompts lower-cased without final period")
    p.add_argument("--absent-share", type=float, default=0.0,
                   help="share of single-image count questions turned to an absent shape ('0')")
    p.add_argument("--kind-weights", default="",
                   help="training mix, e.g. 'multi_turn=0.3,count=0.2' (others keep theirs)")
    p.add_argument("--log-every", type=int, default=50)
    args = p.parse_args(argv)
    if args.steps == 0 and args.warmup < 10 + args.calibrate:
        p.error("--warmup must cover the calibration steps")
    try:
        # In place, and here: data-loader workers fork after this and must see the same mix.
        KIND_WEIGHTS.update(parse_kind_weights(args.kind_weights))
    except ValueError as exc:
        p.error(str(exc))
    return args


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """Run one training stage with the arguments ``argv`` (default: ``sys.argv[1:]``)."""
    args = parse_args(argv, prog)
    tokenizer, config = write_model_files(args.out, args.text_layers)

    # Seeded after the tokenizer is built, right before the weights are initialised: the
    # initial weights depend on --seed and the config alone.
    torch.manual_seed(args.seed)
    model = build_hf_model(config, tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"))
    if args.init_from:
        load_original_weights(model, args.init_from)
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M", flush=True)
    result = train(args, model.to(args.device), tokenizer)
    save_weights(model, args.out)

    result["eval"], failures = evaluate_saved(args.out, args.device, args.eval_n)
    result["args"] = {k: str(v) for k, v in vars(args).items()}
    result["failures"] = failures
    (args.out / "train_log.json").write_text(json.dumps(result, indent=1) + "\n")
