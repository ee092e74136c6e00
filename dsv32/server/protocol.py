"""The OpenAI-compatible wire format: pydantic models of every request the server accepts and every response and
stream chunk it sends, with vLLM's field names and defaults (SGLang's spellings accepted where they differ).

Requests allow unknown fields (vLLM and SGLang ignore them and clients rely on that); the validators here check only
what a request can get wrong on its own. Checks that need the engine (context length, vocabulary, ``max_logprobs``,
``n`` against ``max_num_seqs``) are ``dsv32.engine.validation``'s; the model name is ``ServerState``'s.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from dsv32.engine.sampling_params import as_json_schema, is_json_schema

# OpenAI's rule for function names, plus '.' and ':' which MCP-style tool names use. A quote or '>' would break the
# DSML `<｜DSML｜invoke name="...">` tag the model has to reproduce.
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")
_JSON_SCHEMA_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def random_uuid() -> str:
    return uuid.uuid4().hex


class OpenAIBaseModel(BaseModel):
    # Unknown fields are accepted and ignored (logged by the serving code), as vLLM does.
    model_config = ConfigDict(extra="allow")


# --------------------------------------------------------------------------------------------------------------------
# Chat request
# --------------------------------------------------------------------------------------------------------------------


class TextContentPart(OpenAIBaseModel):
    type: Literal["text"]
    text: str


class FunctionCallIn(OpenAIBaseModel):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(OpenAIBaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


def check_block_types(value: Any, allowed: set[str], message: str) -> Any:
    """``value`` unchanged, unless it is a list with an item whose ``type`` is not in ``allowed``: then a
    ``ValueError`` of ``message`` formatted with that type (pydantic turns it into a 400 naming the field)."""
    if isinstance(value, list):
        for part in value:
            kind = part.get("type") if isinstance(part, dict) else None
            if not isinstance(kind, str) or kind not in allowed:  # a list or dict "type" is unhashable
                raise ValueError(message.format(kind))
    return value


class ChatMessage(OpenAIBaseModel):
    """One message of the conversation. Assistant history may carry ``reasoning_content`` or ``reasoning``."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _only_text_parts(cls, value: Any) -> Any:
        return check_block_types(value, {"text"}, "content part type {!r} is not supported: this model reads text "
                                 "only (use {{'type': 'text', 'text': ...}})")

    def text(self) -> str | None:
        """The content as one string: text parts joined with newlines, as vLLM (and dsv32.encoding) join them."""
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return self.content


class FunctionDefinition(OpenAIBaseModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        if not _TOOL_NAME.match(name):
            raise ValueError(f"invalid function name {name!r}: use 1-64 characters from a-z, A-Z, 0-9, '_', '-', "
                             "'.', ':'")
        return name

    @field_validator("parameters")
    @classmethod
    def _valid_schema(cls, parameters: dict[str, Any] | None) -> dict[str, Any] | None:
        if parameters is not None:
            check_json_schema(parameters, "parameters")
        return parameters


class ChatCompletionToolParam(OpenAIBaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(OpenAIBaseModel):
    name: str


class NamedToolChoice(OpenAIBaseModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class StreamOptions(OpenAIBaseModel):
    include_usage: bool | None = True
    continuous_usage_stats: bool | None = False


class ResponseFormat(OpenAIBaseModel):
    """OpenAI's ``text`` / ``json_object`` / ``json_schema`` (``{"name", "schema", "strict"}``), and vLLM's
    ``structural_tag`` (xgrammar's ``{"format": ...}``, or the older ``structures`` + ``triggers``)."""

    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format.json_schema is required when response_format.type is 'json_schema'")
        return self


def check_json_schema(schema: Any, where: str) -> None:
    """A structural check of a tool's JSON Schema: enough to refuse schemas no client meant to send (a list, an
    unknown ``type``, ``properties`` that are not schemas, ``required`` that is not a list of names)."""
    if isinstance(as_json_schema(schema, where), bool):
        return  # true / false: any value, or none
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
    for k in kinds:
        if k not in _JSON_SCHEMA_TYPES:
            raise ValueError(f"{where}.type {k!r} is not a JSON Schema type ({', '.join(sorted(_JSON_SCHEMA_TYPES))})")
    properties = schema.get("properties")
    if properties is not None:
        if not isinstance(properties, dict):
            raise ValueError(f"{where}.properties must be an object mapping names to schemas")
        for name, sub in properties.items():
            check_json_schema(sub, f"{where}.properties.{name}")
    required = schema.get("required")
    if required is not None and not (isinstance(required, list) and all(isinstance(r, str) for r in required)):
        raise ValueError(f"{where}.required must be a list of property names")
    # A list of schemas is the older (draft 4) tuple form.
    if "items" in schema and not (is_json_schema(schema["items"]) or isinstance(schema["items"], list)):
        raise ValueError(f"{where}.items must be a schema")


class SamplingExtensions(BaseModel):
    """vLLM's sampling fields that another API's own request shape lacks (Anthropic's Messages, OpenAI's Responses):
    clients send them as the SDK's ``extra_body``, and they mean what they mean on the chat route."""

    top_k: int | None = None
    seed: int | None = Field(default=None, ge=_INT64_MIN, le=_INT64_MAX)
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def sampling_extensions(self) -> dict[str, Any]:
        """The extension fields the request set, as chat request fields."""
        return {name: value for name in SamplingExtensions.model_fields if (value := getattr(self, name)) is not None}


class SamplingFields(OpenAIBaseModel):
    """Sampling and stopping fields shared by chat and completions (vLLM extensions included)."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = Field(default=None, ge=_INT64_MIN, le=_INT64_MAX)
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    request_id: str | None = None
    # SGLang's spelling of request_id.
    rid: str | None = None
    # vLLM's structured outputs: {"json" | "regex" | "choice" | "grammar" | "json_object" | "structural_tag": ...},
    # and the older guided_* fields; dsv32.server.sampling turns them (and response_format) into one constraint.
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # SGLang's spellings: regex, EBNF grammar, JSON schema (as JSON text or an object).
    regex: str | None = None
    ebnf: str | None = None
    json_schema: str | dict[str, Any] | None = None
    response_format: ResponseFormat | None = None
    # SGLang's fields, which vllm-router and sglang-router add to every request they forward: `no_stop_trim` is
    # SGLang's include_stop_str_in_output; hidden states are not returned by this server.
    no_stop_trim: bool = False
    return_hidden_states: bool = False

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("Stream options can only be defined when `stream=True`.")
        if self.return_hidden_states:
            raise ValueError("return_hidden_states is not supported by this server.")
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    tools: list[ChatCompletionToolParam] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    reasoning_effort: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # DeepSeek's own API switch ({"type": "enabled"}) and SGLang's ({"enabled": true}).
    thinking: dict[str, Any] | bool | None = None
    reasoning: dict[str, Any] | None = None
    include_reasoning: bool = True
    # SGLang: false keeps the reasoning inside `content`.
    separate_reasoning: bool = True
    # SGLang (and the routers, which always send it): false would hold the reasoning back until it ends.
    stream_reasoning: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    echo: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if not self.stream_reasoning:
            raise ValueError("stream_reasoning=false is not supported: reasoning is always streamed as it comes.")
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise ValueError("when using `top_logprobs`, `logprobs` must be set to true.")
            if self.top_logprobs < 0:
                raise ValueError("`top_logprobs` must be a non-negative value.")
        if self.tools is not None and len(self.tools) == 0:
            raise ValueError("`tools` must not be an empty list; omit it to send no tools.")
        choice = self.tool_choice
        if choice == "required" or isinstance(choice, NamedToolChoice):
            if not self.tools:
                raise ValueError("When using `tool_choice`, `tools` must be set.")
            if isinstance(choice, NamedToolChoice):
                names = [tool.function.name for tool in self.tools]
                if choice.function.name not in names:
                    raise ValueError(f"Tool '{choice.function.name}' has not been passed in `tools`.")
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise ValueError("`continue_final_message` needs the last message to be an assistant message.")
        return self

    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` wins over the deprecated ``max_tokens``."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def effective_tool_choice(self) -> str | NamedToolChoice:
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"


# --------------------------------------------------------------------------------------------------------------------
# Completions request
# --------------------------------------------------------------------------------------------------------------------

Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingFields):
    prompt: Prompt
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None
    add_special_tokens: bool = True

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, prompt: Prompt) -> Prompt:
        if isinstance(prompt, list) and (len(prompt) == 0 or any(isinstance(p, list) and not p for p in prompt)):
            raise ValueError("Prompt cannot be empty.")
        return prompt

    @model_validator(mode="after")
    def _consistent(self) -> CompletionRequest:
        if self.suffix is not None:
            raise ValueError("suffix is not currently supported")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError("`logprobs` must be a non-negative value.")
        if self.max_tokens is not None and self.max_tokens < 0:
            raise ValueError(f"max_tokens must be at least 0, got {self.max_tokens}.")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens=0 is only allowed together with echo=true (to score the prompt).")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of={self.best_of} is not supported: only best_of == n is.")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts, each a string or a list of token ids, in request order."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer endpoints
# --------------------------------------------------------------------------------------------------------------------


class TokenizeRequest(OpenAIBaseModel):
    """vLLM's two shapes: a raw ``prompt``, or chat ``messages`` rendered with the V3.2 encoding."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[ChatCompletionToolParam] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    continue_final_message: bool = False
    add_special_tokens: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        return self


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: list[int]


# --------------------------------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


def usage_info(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> UsageInfo:
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatResponseMessage(BaseModel):
    """The assistant's answer. ``reasoning`` (vLLM) and ``reasoning_content`` (SGLang, DeepSeek API) carry the same
    text; ``tool_calls`` is left out when there are none (DeepSeek's API and newest vLLM)."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_empty_tool_calls(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if not data.get("tool_calls"):
            data.pop("tool_calls", None)
        return data


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None
    prompt_logprobs: Any = None


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class DeltaMessage(BaseModel):
    """A streamed piece of the answer; only the fields this piece sets are sent (OpenAI's delta convention)."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _only_set_fields(self, handler: Any) -> dict[str, Any]:
        return _drop_nones(handler(self))

    def is_empty(self) -> bool:
        return not any((self.role, self.content, self.reasoning, self.reasoning_content, self.tool_calls))


def _drop_nones(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nones(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nones(v) for v in value]
    return value


class ChatCompletionStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: parallel lists over positions."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # vLLM's `prompt_logprobs` extension: per prompt position (first null), token id -> logprob, rank, text.
    prompt_logprobs: list[dict[str, dict[str, Any]] | None] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "dsv32"
    root: str
    parent: str | None = None
    max_model_len: int
    permission: list[dict[str, Any]] = Field(default_factory=list)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
