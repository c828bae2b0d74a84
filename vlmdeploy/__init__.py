"""vlmdeploy: fast, correct and safe deployment of InternVL3.5 vision-language models.

``from vlmdeploy import pipeline, PytorchEngineConfig, GenerationConfig`` is a drop-in for
LMDeploy's API. ``pipeline`` (in :mod:`vlmdeploy.frontend.pipeline`) is imported on first use, so
the configuration classes, the server's request handling and the CLI's argument parsing load
without the engine.
"""

from typing import Any

from vlmdeploy.messages import (
    GenerationConfig,
    PytorchEngineConfig,
    Response,
    TurbomindEngineConfig,
    VisionConfig,
)
from vlmdeploy.model import ChatTemplateConfig

__all__ = ["pipeline", "ChatTemplateConfig", "GenerationConfig", "PytorchEngineConfig",
           "Response", "TurbomindEngineConfig", "VisionConfig"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "pipeline":
        from vlmdeploy.frontend.pipeline import pipeline

        globals()["pipeline"] = pipeline  # a plain attribute from now on
        return pipeline
    raise AttributeError(f"module 'vlmdeploy' has no attribute {name!r}")
