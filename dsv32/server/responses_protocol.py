"""OpenAI's Responses API wire format: pydantic models of the ``POST /v1/responses`` body and of the usage it answers
with (the response object and its output items are built by ``dsv32.server.responses``).

Requests are checked as OpenAI checks them (a function ``tool_choice`` naming a tool that exists, ``background``
only with ``store``) plus what this text-only server runs: input items are messages (``input_text`` /
``output_text`` content), ``function_call`` / ``function_call_output`` items of a tool round trip and ``reasoning``
items; tools are function tools (Responses' flat shape). Images, files, audio, built-in tools (``web_search``,
``file_search``, ``computer_use_preview``, MCP, ...), stored prompts and conversations are refused with a 400 that
says so. Unknown fields are accepted and ignored (``user``, ``service_tier``, ``prompt_cache_key``, ...), as the
OpenAI models do; vLLM's sampling extensions (``SamplingExtensions``) may be sent too (the SDK's ``extra_body``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dsv32.encoding.requests import REASONING_EFFORTS
from dsv32.server.protocol import FunctionDefinition, SamplingExtensions, check_block_types

# Input item types this server reads; OpenAI's others (item_reference, web_search_call, computer_call, ...) belong to
# tools it does not run.
_ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning")
_TEXT_PARTS = {"input_text", "output_text"}
_TEXT_ONLY = "content part type {!r} is not supported: this model reads text only (input_text / output_text parts)"


class ResponsesBaseModel(BaseModel):
    # Unknown fields are accepted and ignored (and logged), as in the OpenAI models.
    model_config = ConfigDict(extra="allow")


class TextPart(ResponsesBaseModel):
    type: Literal["input_text", "output_text"]
    text: str


def _joined(content: str | list[TextPart]) -> str:
    return content if isinstance(content, str) else "\n".join(part.text for part in content)


class MessageItem(ResponsesBaseModel):
    """A conversation message; ``type`` may be left out (OpenAI's "easy input message")."""

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[TextPart]

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        return check_block_types(value, _TEXT_PARTS, _TEXT_ONLY)

    def text(self) -> str:
        return _joined(self.content)


class FunctionCallItem(ResponsesBaseModel):
    """A call the model made in an earlier turn (as a response's output gave it)."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(ResponsesBaseModel):
    """The client's result of the call ``call_id``."""

    type: Literal["function_call_output"]
    call_id: str
    output: str | list[TextPart]

    @field_validator("output", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        return check_block_types(value, _TEXT_PARTS, _TEXT_ONLY)

    def text(self) -> str:
        return _joined(self.output)


class ReasoningText(ResponsesBaseModel):
    type: Literal["reasoning_text", "summary_text"]
    text: str


class ReasoningItem(ResponsesBaseModel):
    """The model's reasoning of an earlier turn (its ``content``, else its ``summary``)."""

    type: Literal["reasoning"]
    summary: list[ReasoningText] = Field(default_factory=list)
    content: list[ReasoningText] | None = None

    def text(self) -> str:
        return "".join(part.text for part in self.content or self.summary)


InputItem = Annotated[MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem,
                      Field(discriminator="type")]


class FunctionTool(ResponsesBaseModel):
    """Responses' flat function tool: ``{"type": "function", "name", "description", "parameters", "strict"}``."""

    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _valid_function(self) -> FunctionTool:
        # The chat path's checks (name characters, JSON Schema shape), reported against this tool.
        FunctionDefinition(name=self.name, parameters=self.parameters)
        return self


class FunctionToolChoice(ResponsesBaseModel):
    type: Literal["function"]
    name: str


class ReasoningConfig(ResponsesBaseModel):
    """``effort`` other than "none" turns V3.2's thinking mode on (its depth is the model's own)."""

    effort: Literal[REASONING_EFFORTS] | None = None  # type: ignore[valid-type]
    summary: Literal["auto", "concise", "detailed"] | None = None

    @property
    def thinking(self) -> bool:
        return self.effort != "none"


class TextFormat(ResponsesBaseModel):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    json_schema: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    @model_validator(mode="after")
    def _schema_given(self) -> TextFormat:
        if self.type == "json_schema" and (self.json_schema is None or self.name is None):
            raise ValueError("text.format.name and text.format.schema are required when text.format.type is "
                             "'json_schema'")
        return self

    def response_format(self) -> dict[str, Any] | None:
        """The chat request's ``response_format`` for this format (None: free text)."""
        if self.type == "json_schema":
            return {"type": "json_schema", "json_schema": {"name": self.name, "schema": self.json_schema,
                                                           "strict": self.strict}}
        return {"type": "json_object"} if self.type == "json_object" else None


class TextConfig(ResponsesBaseModel):
    format: TextFormat | None = None


def _supported_items(value: Any) -> Any:
    """An item without ``type`` is a message; a type this server does not read is a clear error."""
    if not isinstance(value, list):
        return value
    items = []
    for item in value:
        if isinstance(item, dict) and "type" not in item and "role" in item:
            item = {**item, "type": "message"}
        kind = item.get("type") if isinstance(item, dict) else None
        if not isinstance(kind, str) or kind not in _ITEM_TYPES:
            raise ValueError(f"input item type {kind!r} is not supported: this server reads "
                             f"{', '.join(_ITEM_TYPES)} items")
        items.append(item)
    return items


class ResponsesRequest(SamplingExtensions, ResponsesBaseModel):
    """``POST /v1/responses``."""

    model: str | None = None
    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionToolChoice | None = None
    parallel_tool_calls: bool = True
    reasoning: ReasoningConfig | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    text: TextConfig | None = None
    previous_response_id: str | None = None
    store: bool = True
    background: bool = False
    stream: bool = False
    metadata: dict[str, str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    include: list[str] | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _known_items(cls, value: Any) -> Any:
        return _supported_items(value)

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools(cls, value: Any) -> Any:
        for tool in value if isinstance(value, list) else []:
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind != "function":
                raise ValueError(f"tool type {kind!r} is not supported: this server runs no built-in tools; give "
                                 "function tools ({\"type\": \"function\", \"name\", \"parameters\"})")
        return value

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _function_choice(cls, value: Any) -> Any:
        if isinstance(value, dict) and value.get("type") != "function":
            raise ValueError(f"tool_choice type {value.get('type')!r} is not supported: use 'none', 'auto', "
                             "'required' or {\"type\": \"function\", \"name\": ...}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _no_unsupported_features(cls, value: Any) -> Any:
        if isinstance(value, dict):
            for name, why in (("conversation", "the Conversations API is not served here; chain responses with "
                                               "previous_response_id"),
                              ("prompt", "stored prompt templates are not served here; send input and "
                                         "instructions")):
                if value.get(name) is not None:
                    raise ValueError(f"{name} is not supported: {why}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ResponsesRequest:
        if self.tools is not None:
            names = [tool.name for tool in self.tools]
            if len(set(names)) != len(names):
                raise ValueError("tool names must be unique")
        choice = self.tool_choice
        if choice == "required" and not self.tools:
            raise ValueError("tool_choice 'required' needs tools")
        if isinstance(choice, FunctionToolChoice) and choice.name not in [tool.name for tool in self.tools or []]:
            raise ValueError(f"tool_choice names the function {choice.name!r}, which is not in tools")
        if self.background and not self.store:
            raise ValueError("background=true needs store=true (a background response is fetched back later)")
        if self.background and self.stream:
            raise ValueError("background=true with stream=true is not supported: stream it, or poll the background "
                             "response with GET /v1/responses/{id}")
        if self.truncation == "auto":
            raise ValueError("truncation 'auto' is not supported: the conversation is never cut to fit; an input "
                             "longer than the context is refused")
        if self.top_logprobs or "message.output_text.logprobs" in (self.include or []):
            raise ValueError("logprobs are not supported on /v1/responses; use /v1/chat/completions for them")
        return self


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    """``input_tokens`` is the whole prompt, ``cached_tokens`` the part of it the prefix cache held."""

    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int
