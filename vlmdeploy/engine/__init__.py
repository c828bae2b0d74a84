"""The engine: scheduling, paged KV cache, vision stage, model runner, and the thread that steps
them. A front end holds only the :class:`EngineLoop` that :func:`start_engine` returns."""

from __future__ import annotations

from vlmdeploy.config import ModelConfig
from vlmdeploy.engine.config import EngineConfig
from vlmdeploy.engine.engine_loop import EngineLoop
from vlmdeploy.engine.llm_engine import LLMEngine
from vlmdeploy.messages import PytorchEngineConfig


def start_engine(
    model_path: str,
    backend_config: PytorchEngineConfig,
    model_cfg: ModelConfig,
    image_token_id: int,
) -> EngineLoop:
    """Load the model, size the KV cache, capture graphs, warm up, and start stepping."""
    cfg = EngineConfig.build(backend_config, model_cfg, model_path, image_token_id)
    return EngineLoop(LLMEngine(cfg))


__all__ = ["EngineConfig", "EngineLoop", "LLMEngine", "start_engine"]
