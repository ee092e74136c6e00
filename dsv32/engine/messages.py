"""What crosses the boundary between an engine client (the API server's side) and the engine-core loop, in either
direction.

Client -> engine: ``AddRequest``, ``AbortRequest``, ``UtilityCall`` (a method of the core run between two steps,
e.g. ``reset_prefix_cache``), ``Shutdown``. Engine -> client: one ``StepOutputs`` per loop iteration that changed
anything, carrying every request's output of that step, the failures, utility results and a stats snapshot.

The outputs are the core's own ``RequestOutput`` deltas (only what each request gained in that step, see
``dsv32.engine.outputs``), sent as they are: the same objects in one process, pickled across two. Plain dataclasses;
torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dsv32.config import ModelConfig
from dsv32.engine.outputs import EngineStats, RequestOutput
from dsv32.engine.sampling_params import SamplingParams


@dataclass
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None


@dataclass
class AbortRequest:
    request_id: str


@dataclass
class UtilityCall:
    """Call ``EngineCore.<method>()`` between two steps; the result comes back in ``StepOutputs.utility_results``."""

    call_id: int
    method: str


@dataclass
class Shutdown:
    """Abort whatever is left, report it, and stop the loop."""


Command = AddRequest | AbortRequest | UtilityCall | Shutdown


@dataclass
class Failure:
    """A request the engine ended because of an error; ``invalid``: it was refused when added (a 400, not a 500)."""

    request_id: str
    message: str
    invalid: bool = False


@dataclass
class StepOutputs:
    """Everything one iteration of the engine loop reports, in one message."""

    outputs: list[RequestOutput]
    stats: EngineStats
    failures: list[Failure] = field(default_factory=list)
    utility_results: list[tuple[int, Any]] = field(default_factory=list)
    num_seqs_added: int = 0  # sequences of AddRequests taken in this iteration (added or refused)


@dataclass
class EngineReady:
    """The engine-core process loaded its model; what the client needs to know about it."""

    model_config: ModelConfig
    max_model_len: int
    stats: EngineStats


@dataclass
class EngineStartupFailed:
    message: str
