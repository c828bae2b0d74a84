"""vlmdeploy: fast, correct and safe deployment of InternVL3.5 vision-language models.

``from vlmdeploy import pipeline, PytorchEngineConfig, GenerationConfig`` is a drop-in for
LMDeploy's API.
"""

from vlmdeploy.api import pipeline
from vlmdeploy.messages import GenerationConfig, PytorchEngineConfig, Response, VisionConfig

__all__ = ["pipeline", "GenerationConfig", "PytorchEngineConfig", "Response", "VisionConfig"]
__version__ = "0.1.0"
