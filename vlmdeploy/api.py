"""``pipeline()``: the entry point of the Python API, with LMDeploy's signature."""

from __future__ import annotations

from typing import Any

from vlmdeploy.messages import PytorchEngineConfig


def pipeline(
    model_path: str | None = None,
    backend_config: PytorchEngineConfig | None = None,
    chat_template_config: Any = None,
    log_level: str = "WARNING",
    max_log_len: int | None = None,
    **kwargs: Any,
):
    """Load a model and return a :class:`~vlmdeploy.pipeline.Pipeline`.

    ``model_path`` is a local checkpoint directory (original or -HF InternVL3.5 format); when
    omitted, the embedded default model shipped with the package is used.
    """
    import logging

    from vlmdeploy.pipeline import Pipeline

    logging.getLogger("vlmdeploy").setLevel(log_level)
    if chat_template_config is not None:
        raise NotImplementedError(
            "chat_template_config is not supported yet: the checkpoint's own chat template is used"
        )
    from vlmdeploy.assets import resolve_model_path

    model_path = resolve_model_path(
        model_path
    )  # None or the default model's name: the embedded one
    if backend_config is not None and not isinstance(backend_config, PytorchEngineConfig):
        raise NotImplementedError(
            f"{type(backend_config).__name__} is not supported: vlmdeploy runs its "
            "PyTorch engine; pass a PytorchEngineConfig"
        )
    return Pipeline(model_path, backend_config=backend_config, **kwargs)
