"""Anthropic's Messages API wire format: pydantic models of the ``POST /v1/messages`` and
``POST /v1/messages/count_tokens`` bodies, and of the message the server answers with.

Requests are checked as Anthropic checks them (``max_tokens`` required, ``temperature`` in [0, 1], ``tool_choice``
naming a tool that exists, ``tool_use`` blocks only in assistant turns, ``tool_result`` blocks only in user turns)
plus what this text-only model needs (no image or document blocks, no Anthropic-hosted server tools). Unknown fields
are accepted and ignored (``cache_control``, ``metadata``, ``service_tier``, ...), as the OpenAI models do. vLLM's
sampling extensions (``SamplingExtensions``: ``seed``, ``ignore_eos``, ``min_p``, ...) may be sent too (the SDK's
``extra_body``).
``dsv32.server.anthropic`` turns a request into the chat path's ``ChatCompletionRequest``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dsv32.server.protocol import SamplingExtensions, check_block_types, check_json_schema

# Anthropic's rule for tool names (the chat path's, without '.' and ':').
TOOL_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"

# Block types a conversation may hold here; the others Anthropic defines (image, document, search_result, ...) need
# a model that reads more than text.
_BLOCK_TYPES = ("text", "tool_use", "tool_result", "thinking", "redacted_thinking")


class AnthropicBaseModel(BaseModel):
    # Unknown fields are accepted and ignored (and logged), as in the OpenAI models.
    model_config = ConfigDict(extra="allow")


class TextBlock(AnthropicBaseModel):
    type: Literal["text"]
    text: str


class ToolUseBlock(AnthropicBaseModel):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(AnthropicBaseModel):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] | None = None
    # Not rendered: the V3.2 format has no slot for it (the result's text says what went wrong).
    is_error: bool | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        return check_block_types(value, {"text"}, "tool_result content block type {!r} is not supported: this model "
                                 "reads text only")

    def text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(block.text for block in self.content)
        return self.content or ""


class ThinkingBlock(AnthropicBaseModel):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(AnthropicBaseModel):
    type: Literal["redacted_thinking"]
    data: str


ContentBlock = Annotated[TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock,
                         Field(discriminator="type")]


class AnthropicMessage(AnthropicBaseModel):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]

    @field_validator("content", mode="before")
    @classmethod
    def _known_blocks(cls, value: Any) -> Any:
        return check_block_types(value, set(_BLOCK_TYPES), "content block type {!r} is not supported: this model "
                                 f"reads {', '.join(_BLOCK_TYPES)} blocks")

    @model_validator(mode="after")
    def _blocks_fit_the_role(self) -> AnthropicMessage:
        if isinstance(self.content, list):
            misplaced = {"user": ("tool_use", "thinking", "redacted_thinking"), "assistant": ("tool_result",)}
            for block in self.content:
                if block.type in misplaced[self.role]:
                    raise ValueError(f"a {block.type} block cannot be in a {self.role} message")
        return self


class AnthropicTool(AnthropicBaseModel):
    """A client tool; Anthropic's server tools (``web_search_...``, ``bash_...``) run on Anthropic's side."""

    name: str = Field(pattern=TOOL_NAME_PATTERN)
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _client_tool(cls, value: Any) -> Any:
        if isinstance(value, dict) and value.get("type") not in (None, "custom"):
            raise ValueError(f"tool type {value.get('type')!r} is one of Anthropic's server tools, which this server "
                             "does not run; give client tools ({\"name\", \"description\", \"input_schema\"})")
        return value

    @field_validator("input_schema")
    @classmethod
    def _object_schema(cls, schema: dict[str, Any]) -> dict[str, Any]:
        if schema.get("type") != "object":
            raise ValueError("input_schema.type must be 'object'")
        check_json_schema(schema, "input_schema")
        return schema


class AnthropicToolChoice(AnthropicBaseModel):
    """``auto`` (the model decides), ``any`` (some tool must be called), ``tool`` (the one ``name``d), ``none``."""

    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False

    @model_validator(mode="after")
    def _name_iff_tool(self) -> AnthropicToolChoice:
        if (self.type == "tool") != (self.name is not None):
            raise ValueError("tool_choice.name is required with type 'tool', and only then")
        return self


class AnthropicThinking(AnthropicBaseModel):
    """``enabled`` (with ``budget_tokens``) and ``adaptive`` turn V3.2's thinking mode on, ``disabled`` off. The
    engine has no separate budget for the thinking: ``max_tokens`` bounds thinking and answer together."""

    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(default=None, ge=1)
    # "omitted": the thinking is generated but not returned.
    display: Literal["summarized", "omitted"] | None = None

    @model_validator(mode="after")
    def _budget_when_enabled(self) -> AnthropicThinking:
        if self.type == "enabled" and self.budget_tokens is None:
            raise ValueError("thinking.budget_tokens is required when thinking.type is 'enabled'")
        return self

    @property
    def enabled(self) -> bool:
        return self.type != "disabled"


class AnthropicCountTokensRequest(AnthropicBaseModel):
    """``POST /v1/messages/count_tokens``: the fields that make the prompt."""

    model: str
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    thinking: AnthropicThinking | None = None

    @model_validator(mode="after")
    def _tool_choice_fits_tools(self) -> AnthropicCountTokensRequest:
        choice = self.tool_choice
        if choice is not None and choice.type in ("any", "tool") and not self.tools:
            raise ValueError(f"tool_choice.type '{choice.type}' needs tools")
        if choice is not None and choice.type == "tool":
            names = [tool.name for tool in self.tools or []]
            if choice.name not in names:
                raise ValueError(f"tool_choice names the tool {choice.name!r}, which is not in tools")
        if self.tools is not None:
            names = [tool.name for tool in self.tools]
            if len(set(names)) != len(names):
                raise ValueError("tool names must be unique")
        return self

    def system_text(self) -> str | None:
        if isinstance(self.system, list):
            return "\n".join(block.text for block in self.system)
        return self.system


class AnthropicMessagesRequest(AnthropicCountTokensRequest, SamplingExtensions):
    """``POST /v1/messages`` (``top_k`` is Anthropic's; the other ``SamplingExtensions`` are vLLM's)."""

    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = None

    @model_validator(mode="after")
    def _budget_below_max_tokens(self) -> AnthropicMessagesRequest:
        budget = self.thinking.budget_tokens if self.thinking is not None else None
        if budget is not None and budget >= self.max_tokens:
            raise ValueError(f"thinking.budget_tokens ({budget}) must be less than max_tokens ({self.max_tokens})")
        return self


# ---------------------------------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------------------------------


class AnthropicUsage(BaseModel):
    """``input_tokens`` are the prompt tokens the prefix cache did not hold; ``cache_read_input_tokens`` the ones it
    did (their sum is the prompt). Nothing is written to a cache on request, so ``cache_creation_input_tokens`` is 0."""

    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class AnthropicResponse(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[dict[str, Any]]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]
    stop_sequence: str | None = None
    usage: AnthropicUsage


class AnthropicTokenCount(BaseModel):
    input_tokens: int
