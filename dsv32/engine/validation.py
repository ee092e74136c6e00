"""Request validation, in one place: what a request may ask of this engine (context length, vocabulary, logprobs,
``n``), with vLLM's wording. The server checks each request with it before anything reaches the engine, the engine
clients before they submit one, and the engine core before it adds one, so every path refuses the same requests with
the same message. Checks that need no engine (``temperature >= 0``, ``top_p`` in (0, 1], ...) are ``SamplingParams``'
own. Torch-free: the API-server process imports it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from dsv32.engine.sampling_params import SamplingParams


class InvalidRequestError(ValueError):
    """A request this engine can never serve; ``param`` names the offending field (the server answers 400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class RequestValidator:
    """The limits a request is checked against, all taken from the engine's configuration."""

    max_model_len: int
    vocab_size: int
    max_logprobs: int
    max_num_seqs: int

    def validate(self, prompt_token_ids: list[int], params: SamplingParams, strict_max_tokens: bool = True) -> None:
        """Raise ``InvalidRequestError`` for a request the engine can never serve. With ``strict_max_tokens`` (the
        server's rule) an explicit ``max_tokens`` must fit in ``max_model_len`` too; without it (the offline rule)
        generation just stops at ``max_model_len`` with finish_reason "length"."""
        num_prompt = len(prompt_token_ids)
        if num_prompt == 0:
            raise InvalidRequestError("The decoder prompt cannot be empty", param="prompt")
        self.check_token_ids(prompt_token_ids, "prompt")
        if strict_max_tokens and params.max_tokens is not None:
            self.resolve_max_tokens(params.max_tokens, num_prompt)
        elif num_prompt >= self.max_model_len:
            raise InvalidRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your request has "
                f"{num_prompt} input tokens. Please reduce the length of the input messages.", param="messages")
        self.check_params(params)

    def check_params(self, params: SamplingParams) -> None:
        """What the parameters alone may not ask: more logprobs than allowed, token ids outside the vocabulary."""
        self.check_logprobs(params.logprobs, "logprobs")
        self.check_logprobs(params.prompt_logprobs, "prompt_logprobs")
        self.check_token_ids(params.logit_bias or {}, "logit_bias")
        self.check_token_ids(params.stop_token_ids, "stop_token_ids")

    def resolve_max_tokens(self, requested: int | None, num_prompt: int) -> int:
        """The output budget: what was asked, or everything the context has left (vLLM's default for chat)."""
        asked = 1 if requested is None else requested
        if num_prompt + asked > self.max_model_len:
            raise InvalidRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{num_prompt + asked} tokens ({num_prompt} in the messages, {asked} in the completion). Please "
                "reduce the length of the messages or completion.", param="messages")
        return self.max_model_len - num_prompt if requested is None else requested

    def check_token_ids(self, token_ids: Iterable[int], field: str) -> None:
        bad = sorted({token_id for token_id in token_ids if not 0 <= token_id < self.vocab_size})
        if bad:
            raise InvalidRequestError(f"{field} has token ids outside the vocabulary [0, {self.vocab_size}): {bad}.",
                                      param=field)

    def check_logprobs(self, requested: int | None, field: str) -> None:
        if requested is not None and requested > self.max_logprobs:
            raise InvalidRequestError(f"{field}={requested} is more than max_logprobs={self.max_logprobs} (the "
                                      "server's --max-logprobs).", param=field)

    def check_n(self, n: int) -> None:
        if n > self.max_num_seqs:
            raise InvalidRequestError(f"n={n} is larger than max_num_seqs={self.max_num_seqs}; each completion is a "
                                      "sequence of its own.", param="n")
