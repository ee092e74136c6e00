"""dsv32: an inference engine and OpenAI-compatible server for DeepSeek-V3.2 (and V3/V3.1/R1)."""

from dsv32.engine.llm import LLM
from dsv32.engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
