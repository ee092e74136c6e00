"""From an API request to the engine's validated ``SamplingParams``: the fields the request sets (the rest keep
``SamplingParams``' defaults), the ``logit_bias`` form, and the one structured-outputs constraint its fields ask
for, each failure an HTTP 400 with vLLM's wording. ``build_sampling_params`` ends with the server's one
``RequestValidator`` call per engine request (context length, vocabulary, logprobs, ``n``): nothing downstream
repeats it."""

from __future__ import annotations

import json
from typing import Any

from dsv32.engine.sampling_params import SamplingParams, StructuredOutputsParams, as_json_schema
from dsv32.engine.validation import RequestValidator
from dsv32.server.errors import APIError
from dsv32.server.protocol import SamplingFields

# vLLM clamps logit_bias values to this range, as OpenAI documents.
_LOGIT_BIAS_LIMIT = 100.0


def _logit_bias(request: SamplingFields) -> dict[int, float] | None:
    if not request.logit_bias:
        return None
    bias: dict[int, float] = {}
    for key, value in request.logit_bias.items():
        try:
            token_id = int(key)
        except ValueError:
            raise APIError(f"logit_bias key {key!r} is not a token id.", 400, param="logit_bias") from None
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
            try:
                sources["response_format"] = {"json": as_json_schema(schema, "response_format.json_schema.schema")}
            except ValueError as exc:
                raise APIError(str(exc), 400, param="response_format") from None
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
        sources["tools"] = {"structural_tag": tool_call_tag}
    if not sources:
        return None
    if len(sources) > 1:
        raise APIError(f"Only one kind of structured outputs can be requested at once, got {', '.join(sources)} "
                       "(tool_choice 'required', a named function or strict tools constrain the output too).", 400,
                       param=next(iter(sources)))
    (field, spec), = sources.items()
    try:
        return StructuredOutputsParams(**spec, source=field)
    except ValueError as exc:
        raise APIError(f"{field}: {exc}", 400, param=field) from None


# Request fields that mean what the ``SamplingParams`` field of the same name means: copied when the request sets
# them; unset (None) ones keep ``SamplingParams``' default.
_SAME_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
                "repetition_penalty", "min_tokens", "ignore_eos", "skip_special_tokens", "stop_token_ids")


def build_sampling_params(request: SamplingFields, prompt_token_ids: list[int], validator: RequestValidator, *,
                          max_tokens: int, logprobs: int | None = None, prompt_logprobs: int | None = None,
                          extra_stop: list[str] | None = None,
                          structured_outputs: StructuredOutputsParams | None = None) -> SamplingParams:
    """The engine's parameters for ``request`` on ``prompt_token_ids``, validated (``InvalidRequestError``, a 400,
    for what this engine cannot serve). ``extra_stop`` adds stop strings the server needs on top of the client's."""
    fields = {name: value for name in _SAME_FIELDS if (value := getattr(request, name)) is not None}
    try:
        params = SamplingParams(
            **fields,
            logit_bias=_logit_bias(request),
            max_tokens=max_tokens,
            stop=request.stop_list() + list(extra_stop or []),
            include_stop_str_in_output=request.include_stop_str_in_output or request.no_stop_trim,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            structured_outputs=structured_outputs,
        )
    except ValueError as exc:
        raise APIError(str(exc), 400) from None
    validator.validate(prompt_token_ids, params)
    return params
