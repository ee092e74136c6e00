"""dsv32: an inference engine and OpenAI-compatible server for DeepSeek-V3.2 (and V3/V3.1/R1).

``LLM`` and ``SamplingParams`` are imported on first use, so the ``dsv32`` command line starts without loading torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dsv32.engine.llm import LLM
    from dsv32.engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from dsv32.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from dsv32.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'dsv32' has no attribute {name!r}")
