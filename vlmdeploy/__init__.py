"""vlmdeploy: fast, correct and safe deployment of InternVL3.5 vision-language models.

``from vlmdeploy import pipeline, PytorchEngineConfig, GenerationConfig`` is a drop-in for
LMDeploy's API.
"""

# The submodule vlmdeploy.pipeline (the Pipeline class) is imported first on purpose: importing a
# submodule binds its name on the package, so a later first import would replace the pipeline()
# function below with the module.
import vlmdeploy.pipeline  # noqa: F401  isort: skip
from vlmdeploy.api import pipeline
from vlmdeploy.messages import GenerationConfig, PytorchEngineConfig, Response, VisionConfig

__all__ = ["pipeline", "GenerationConfig", "PytorchEngineConfig", "Response", "VisionConfig"]
__version__ = "0.1.0"
