"""What the engine hands back: per request ``RequestOutput`` / ``CompletionOutput`` / ``Logprob`` (vLLM's shapes), and
the ``EngineStats`` snapshot behind /metrics."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """One candidate token's log-probability, its rank among all tokens (1 = best) and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One dict per position: token id -> Logprob (the sampled/prompt token plus the top-k alternatives).
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    """One of the ``n`` completions of a request. ``text``/``token_ids`` are cumulative."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The state of one request: prompt, completions so far, and whether it has finished."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0


@dataclass
class EngineStats:
    """A snapshot for /metrics and the periodic log line (vLLM's metric names in comments)."""

    num_running: int  # vllm:num_requests_running (sequences)
    num_waiting: int  # vllm:num_requests_waiting
    num_total_blocks: int
    num_free_blocks: int
    kv_cache_usage: float  # vllm:kv_cache_usage_perc, 0..1
    prefix_cache_queries: int  # tokens looked up
    prefix_cache_hits: int  # tokens found
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
