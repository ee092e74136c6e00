"""Request validation, in one place: what a request may ask of this engine (context length, vocabulary, logprobs,
``n``), with vLLM's wording. It runs once per request, where requests enter: the API server before it hands one to
its engine client, the offline ``LLM`` before it adds one to its engine. Engine clients and the engine core do not
repeat it (the core only refuses what would break a step: ``EngineCore.add_request``). Checks that need no engine
(``temperature >= 0``, ``top_p`` in (0, 1], ...) are ``SamplingParams``' own. Torch-free: the API-server process
imports it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from dsv32.config import EngineConfig, ModelConfig
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

    @classmethod
    def for_engine(cls, engine_config: EngineConfig, model_config: ModelConfig, max_model_len: int
                   ) -> RequestValidator:
        """The limits of an engine with these configs and this (resolved) context length."""
        return cls(max_model_len, model_config.vocab_size, engine_config.max_logprobs, engine_config.max_num_seqs)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams, strict_max_tokens: bool = True) -> None:
        """Raise ``InvalidRequestError`` for a request the engine can never serve. With ``strict_max_tokens`` (the
        server's rule) ``max_tokens`` must fit in ``max_model_len`` too; without it (the offline rule) generation
        just stops at ``max_model_len`` with finish_reason "length"."""
        num_prompt = len(prompt_token_ids)
        if num_prompt == 0:
            raise InvalidRequestError("The decoder prompt cannot be empty", param="prompt")
        self.check_token_ids(prompt_token_ids, "prompt")
        if strict_max_tokens and params.max_tokens is not None:
            if num_prompt + params.max_tokens > self.max_model_len:
                raise InvalidRequestError(
                    f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                    f"{num_prompt + params.max_tokens} tokens ({num_prompt} in the messages, {params.max_tokens} in "
                    "the completion). Please reduce the length of the messages or completion.", param="messages")
        elif num_prompt >= self.max_model_len:
            raise InvalidRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your request has "
                f"{num_prompt} input tokens. Please reduce the length of the input messages.", param="messages")
        if params.n > self.max_num_seqs:
            raise InvalidRequestError(f"n={params.n} is larger than max_num_seqs={self.max_num_seqs}; each completion "
                                      "is a sequence of its own.", param="n")
        self._check_logprobs(params.logprobs, "logprobs")
        self._check_logprobs(params.prompt_logprobs, "prompt_logprobs")
        self.check_token_ids(params.logit_bias or {}, "logit_bias")
        self.check_token_ids(params.stop_token_ids, "stop_token_ids")

    def refuse_overlong_text(self, at_least: int) -> InvalidRequestError:
        """The error for a prompt found to have more than ``at_least`` tokens before all of it was tokenized
        (``Tokenizer.count_beyond``): too long whatever else the request asks."""
        return InvalidRequestError(
            f"This model's maximum context length is {self.max_model_len} tokens. However, your request has more "
            f"than {at_least} input tokens. Please reduce the length of the input messages.", param="messages")

    def check_token_ids(self, token_ids: Iterable[int], field: str) -> None:
        """Every id in the vocabulary: also what the tokenizer needs before it decodes ids a client sent."""
        bad = sorted({token_id for token_id in token_ids if not 0 <= token_id < self.vocab_size})
        if bad:
            raise InvalidRequestError(f"{field} has token ids outside the vocabulary [0, {self.vocab_size}): {bad}.",
                                      param=field)

    def _check_logprobs(self, requested: int | None, field: str) -> None:
        if requested is not None and requested > self.max_logprobs:
            raise InvalidRequestError(f"{field}={requested} is more than max_logprobs={self.max_logprobs} (the "
                                      "server's --max-logprobs).", param=field)
