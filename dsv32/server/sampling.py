"""From an API request to the engine's ``SamplingParams``: defaults, the output budget against the context length,
and token-id checks, each failure an HTTP 400 with vLLM's wording."""

from __future__ import annotations

from dsv32.engine.sampling_params import SamplingParams
from dsv32.server.errors import APIError, context_length_error
from dsv32.server.protocol import SamplingFields

# vLLM clamps logit_bias values to this range, as OpenAI documents.
_LOGIT_BIAS_LIMIT = 100.0


def resolve_max_tokens(requested: int | None, prompt_tokens: int, max_model_len: int) -> int:
    """The output budget: what was asked, or everything the context has left (vLLM's default for chat)."""
    if requested is None:
        if prompt_tokens >= max_model_len:
            raise context_length_error(max_model_len, prompt_tokens, 1)
        return max_model_len - prompt_tokens
    if prompt_tokens + requested > max_model_len:
        raise context_length_error(max_model_len, prompt_tokens, requested)
    return requested


def check_token_ids(token_ids: list[int], vocab_size: int, field: str) -> None:
    for token_id in token_ids:
        if not 0 <= token_id < vocab_size:
            raise APIError(f"{field} contains token id {token_id}, outside the vocabulary [0, {vocab_size}).", 400,
                           param=field)


def _logit_bias(request: SamplingFields, vocab_size: int) -> dict[int, float] | None:
    if not request.logit_bias:
        return None
    bias: dict[int, float] = {}
    for key, value in request.logit_bias.items():
        try:
            token_id = int(key)
        except ValueError:
            raise APIError(f"logit_bias key {key!r} is not a token id.", 400, param="logit_bias") from None
        check_token_ids([token_id], vocab_size, "logit_bias")
        bias[token_id] = max(-_LOGIT_BIAS_LIMIT, min(_LOGIT_BIAS_LIMIT, value))
    return bias


def build_sampling_params(request: SamplingFields, *, max_tokens: int, vocab_size: int, max_num_seqs: int,
                          logprobs: int | None = None, prompt_logprobs: int | None = None,
                          extra_stop: list[str] | None = None) -> SamplingParams:
    """The engine's parameters for ``request``; ``None`` fields take vLLM's defaults. ``extra_stop`` adds stop
    strings the server needs on top of the client's."""
    if request.n > max_num_seqs:
        raise APIError(f"n={request.n} is larger than this server's max_num_seqs={max_num_seqs}; each completion "
                       "is a sequence of its own.", 400, param="n")
    stop_token_ids = list(request.stop_token_ids or [])
    check_token_ids(stop_token_ids, vocab_size, "stop_token_ids")
    try:
        return SamplingParams(
            n=request.n,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            top_k=0 if request.top_k is None else request.top_k,
            min_p=0.0 if request.min_p is None else request.min_p,
            seed=request.seed,
            presence_penalty=request.presence_penalty or 0.0,
            frequency_penalty=request.frequency_penalty or 0.0,
            repetition_penalty=1.0 if request.repetition_penalty is None else request.repetition_penalty,
            logit_bias=_logit_bias(request, vocab_size),
            min_tokens=request.min_tokens,
            max_tokens=max_tokens,
            ignore_eos=request.ignore_eos,
            stop=request.stop_list() + list(extra_stop or []),
            stop_token_ids=stop_token_ids,
            include_stop_str_in_output=request.include_stop_str_in_output,
            skip_special_tokens=request.skip_special_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )
    except ValueError as exc:
        raise APIError(str(exc), 400) from None
