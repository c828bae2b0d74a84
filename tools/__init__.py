"""Developer tools: training the embedded default model (``tools/train_default_model.py``),
diagnostics of where time goes (``python -m tools.diagnostics.<name>``) and kernel tuning sweeps
(``python -m tools.tuning.<name>``), run from the project root."""
