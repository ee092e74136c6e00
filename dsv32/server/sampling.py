"""From an API request to the engine's ``SamplingParams``: defaults, the output budget against the context length,
token-id checks and the structured-outputs constraint, each failure an HTTP 400 with vLLM's wording."""

from __future__ import annotations

import json
from typing import Any

from dsv32.engine.sampling_params import SamplingParams, StructuredOutputsParams
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


# vLLM's structured_outputs options that tune its own backends; accepted and ignored here (whitespace is bounded by
# --structured-outputs-config, additional properties follow the schema).
_IGNORED_STRUCTURED_OUTPUT_OPTIONS = ("disable_fallback", "disable_any_whitespace", "disable_additional_properties",
                                      "whitespace_pattern")


def _structured_outputs_sources(request: SamplingFields) -> dict[str, dict[str, Any]]:
    """Each way the request asks for a constraint -> the ``StructuredOutputsParams`` fields it means."""
    sources: dict[str, dict[str, Any]] = {}
    if request.structured_outputs:
        spec = {k: v for k, v in request.structured_outputs.items() if k not in _IGNORED_STRUCTURED_OUTPUT_OPTIONS}
        unknown = sorted(set(spec) - {"json", "regex", "choice", "grammar", "json_object", "structural_tag"})
        if unknown:
            raise APIError(f"structured_outputs has unknown keys {unknown}; use one of json, regex, choice, grammar, "
                           "json_object, structural_tag.", 400, param="structured_outputs")
        if isinstance(spec.get("structural_tag"), dict):
            spec["structural_tag"] = json.dumps(spec["structural_tag"])
        sources["structured_outputs"] = spec
    for field, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                       ("guided_grammar", "grammar"), ("regex", "regex"), ("ebnf", "grammar"), ("json_schema", "json")):
        if getattr(request, field) is not None:
            sources[field] = {key: getattr(request, field)}
    response_format = request.response_format
    if response_format is not None and response_format.type != "text":
        if response_format.type == "json_schema":
            schema = (response_format.json_schema or {}).get("schema")
            if not isinstance(schema, dict):
                raise APIError("response_format.json_schema.schema must be a JSON Schema object.", 400,
                               param="response_format")
            sources["response_format"] = {"json": schema}
        elif response_format.type == "json_object":
            sources["response_format"] = {"json_object": True}
        else:
            sources["response_format"] = {"structural_tag": response_format.model_dump_json(exclude_none=True)}
    return sources


def structured_outputs_params(request: SamplingFields, tool_call_tag: str | None = None
                              ) -> StructuredOutputsParams | None:
    """The one constraint the request asks for (``structured_outputs``, ``guided_*`` or ``response_format``, or the
    tool calls its ``tool_choice`` forces as ``tool_call_tag``), None for free text; two at once are a 400."""
    sources = _structured_outputs_sources(request)
    if tool_call_tag is not None:
        sources["tool_choice"] = {"structural_tag": tool_call_tag}
    if not sources:
        return None
    if len(sources) > 1:
        raise APIError(f"Only one kind of structured outputs can be requested at once, got {', '.join(sources)} "
                       "(tool_choice 'required', a named function or strict tools constrain the output too).", 400,
                       param=next(iter(sources)))
    (field, spec), = sources.items()
    try:
        return StructuredOutputsParams(**spec)
    except ValueError as exc:
        raise APIError(f"{field}: {exc}", 400, param=field) from None


def build_sampling_params(request: SamplingFields, *, max_tokens: int, vocab_size: int, max_num_seqs: int,
                          logprobs: int | None = None, prompt_logprobs: int | None = None,
                          extra_stop: list[str] | None = None,
                          structured_outputs: StructuredOutputsParams | None = None) -> SamplingParams:
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
            include_stop_str_in_output=request.include_stop_str_in_output or request.no_stop_trim,
            skip_special_tokens=request.skip_special_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            structured_outputs=structured_outputs,
        )
    except ValueError as exc:
        raise APIError(str(exc), 400) from None
