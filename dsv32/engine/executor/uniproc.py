"""The model in the engine's own process (one rank)."""

from __future__ import annotations

import torch

from dsv32.config import EngineConfig, ModelConfig
from dsv32.engine.executor.base import Executor
from dsv32.engine.executor.loading import load_engine_model
from dsv32.model.deepseek import DeepseekForCausalLM


class UniProcExecutor(Executor):
    """Loads the model here; the handle is the model itself, and there is nothing to stop."""

    def __init__(self, engine_config: EngineConfig, model_config: ModelConfig, device: torch.device) -> None:
        self.model: DeepseekForCausalLM = load_engine_model(engine_config, model_config, device)

    def close(self) -> None:
        """Nothing runs elsewhere: the model goes with the engine."""
