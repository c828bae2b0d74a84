"""Train the embedded default model: the command's original path, kept so that written command
lines keep working. ``python tools/train_default_model.py ARGS`` runs ``python -m tools.training
ARGS`` (``tools/training/``, whose package docstring describes the training).

Run as a script, this file's folder (``tools/``) is first on ``sys.path``, so the package imports
as ``training``; its modules import one another relatively, so they work under either name.
"""

from __future__ import annotations

if __package__:  # python -m tools.train_default_model, or imported as tools.train_default_model
    from .training.cli import main
else:  # python tools/train_default_model.py
    from training.cli import main

if __name__ == "__main__":
    main()
