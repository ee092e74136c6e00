"""``SamplingParams``: what a request asks of the sampler and the stop logic (vLLM's names and defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """Per-request sampling and stopping options, with vLLM's field names and defaults.

    ``temperature == 0`` means greedy. ``seed`` makes one request reproducible whatever it is batched with.
    ``logprobs``/``prompt_logprobs`` ask for that many top alternatives (0 = only the chosen/prompt token).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    max_tokens: int | None = 16
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        need(self.n >= 1, f"n must be at least 1, got {self.n}.")
        need(self.temperature >= 0.0, f"temperature must be non-negative, got {self.temperature}.")
        need(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}.")
        need(self.top_k >= 0, f"top_k must be -1 (disable), or at least 1, got {self.top_k}.")
        need(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}.")
        need(-2.0 <= self.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        need(-2.0 <= self.frequency_penalty <= 2.0,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        need(self.repetition_penalty > 0.0, f"repetition_penalty must be greater than zero, got "
                                            f"{self.repetition_penalty}.")
        need(self.min_tokens >= 0, f"min_tokens must be greater than or equal to 0, got {self.min_tokens}.")
        need(self.max_tokens is None or self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens}.")
        need(self.max_tokens is None or self.min_tokens <= self.max_tokens,
             f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, got {self.min_tokens}.")
        need(all(self.stop), "stop cannot contain an empty string.")
        need(self.logprobs is None or self.logprobs >= 0, f"logprobs must be non-negative, got {self.logprobs}.")
        need(self.prompt_logprobs is None or self.prompt_logprobs >= 0,
             f"prompt_logprobs must be non-negative, got {self.prompt_logprobs}.")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5
