"""``python -m tools.training ARGS``: one training stage of the embedded default model (``cli``)."""

from .cli import main

# Guarded: a data-loader worker started by "spawn" re-imports the main module, and must not train.
if __name__ == "__main__":
    main(prog="python -m tools.training")
