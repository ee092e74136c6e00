"""What crosses the boundary between an engine client (the API server's side) and the engine-core loop, in either
direction, and the delta form outputs take when that boundary is a process boundary.

Client -> engine: ``AddRequest``, ``AbortRequest``, ``UtilityCall`` (a method of the core run between two steps,
e.g. ``reset_prefix_cache``), ``Shutdown``. Engine -> client: one ``StepOutputs`` per loop iteration that changed
anything, carrying every request's output of that step, the failures, utility results and a stats snapshot.

Outputs are cumulative inside one process (``RequestOutput``: the whole text so far). Across processes that would
resend every request's whole text every step, so ``DeltaEncoder`` turns them into ``RequestDelta``s (only what is
new since the last one) on the engine side and ``apply_delta`` rebuilds the cumulative ``RequestOutput`` on the
client side. Plain dataclasses, pickled; torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dsv32.config import ModelConfig
from dsv32.engine.outputs import CompletionOutput, EngineStats, PositionLogprobs, RequestOutput
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
class CompletionDelta:
    """What one completion gained since the previous delta of its request (finish fields are absolute)."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[PositionLogprobs] | None
    cumulative_logprob: float | None
    finish_reason: str | None
    stop_reason: int | str | None


@dataclass
class RequestDelta:
    request_id: str
    completions: list[CompletionDelta]
    finished: bool
    prompt_logprobs: list[PositionLogprobs | None] | None  # positions not sent before
    num_cached_tokens: int


@dataclass
class StepOutputs:
    """Everything one iteration of the engine loop reports, in one message."""

    outputs: list[RequestOutput] | list[RequestDelta]
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


class DeltaEncoder:
    """Engine side: cumulative ``RequestOutput`` -> ``RequestDelta``, remembering what each request was sent."""

    def __init__(self) -> None:
        # request id -> (prompt logprob positions sent, per completion: (text chars, tokens, logprob positions) sent)
        self._sent: dict[str, tuple[int, dict[int, tuple[int, int, int]]]] = {}

    def encode(self, out: RequestOutput) -> RequestDelta:
        prompt_sent, completions_sent = self._sent.get(out.request_id, (0, {}))
        completions = []
        for c in out.outputs:
            text_sent, tokens_sent, logprobs_sent = completions_sent.get(c.index, (0, 0, 0))
            completions.append(CompletionDelta(
                c.index, c.text[text_sent:], c.token_ids[tokens_sent:],
                None if c.logprobs is None else c.logprobs[logprobs_sent:], c.cumulative_logprob,
                c.finish_reason, c.stop_reason))
            completions_sent[c.index] = (len(c.text), len(c.token_ids), len(c.logprobs or ()))
        prompt_logprobs = None if out.prompt_logprobs is None else out.prompt_logprobs[prompt_sent:]
        if out.finished:
            self._sent.pop(out.request_id, None)
        else:
            self._sent[out.request_id] = (len(out.prompt_logprobs or ()), completions_sent)
        return RequestDelta(out.request_id, completions, out.finished, prompt_logprobs, out.num_cached_tokens)


def apply_delta(previous: RequestOutput | None, delta: RequestDelta, prompt: str | None,
                prompt_token_ids: list[int]) -> RequestOutput:
    """Client side: the request's new cumulative output (fresh objects: earlier outputs stay as they were)."""
    before = {c.index: c for c in previous.outputs} if previous is not None else {}
    outputs = []
    for d in delta.completions:
        old = before.get(d.index)
        if old is None:
            old = CompletionOutput(index=d.index, logprobs=[] if d.logprobs is not None else None)
        outputs.append(CompletionOutput(
            index=d.index, text=old.text + d.text, token_ids=old.token_ids + d.token_ids,
            cumulative_logprob=d.cumulative_logprob,
            logprobs=None if d.logprobs is None else (old.logprobs or []) + d.logprobs,
            finish_reason=d.finish_reason, stop_reason=d.stop_reason))
    prompt_logprobs = previous.prompt_logprobs if previous is not None else None
    if delta.prompt_logprobs is not None:
        prompt_logprobs = (prompt_logprobs or []) + delta.prompt_logprobs
    return RequestOutput(request_id=delta.request_id, prompt=prompt, prompt_token_ids=prompt_token_ids,
                         outputs=outputs, finished=delta.finished, prompt_logprobs=prompt_logprobs,
                         num_cached_tokens=delta.num_cached_tokens)
