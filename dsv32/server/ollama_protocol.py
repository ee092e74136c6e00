"""Ollama's native API wire format: pydantic models of the ``/api/chat``, ``/api/generate`` and ``/api/show`` bodies.

Requests are checked as Ollama checks them (``model`` required, ``format`` is "json" or a JSON schema, ``options``
of the right types) plus what this text-only server runs: no ``images``, no raw prompts, no Go templates, no
``suffix`` (fill-in-the-middle) and no ``context`` token arrays (send the conversation to ``/api/chat``). Unknown
fields and unknown ``options`` (``num_ctx``, ``num_gpu``, ``mirostat``, ...) are accepted and ignored, as Ollama
ignores options a runner does not use. ``dsv32.server.ollama`` turns a request into the chat path's
``ChatCompletionRequest``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dsv32.server.protocol import FunctionDefinition, check_json_schema

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class OllamaBaseModel(BaseModel):
    # Unknown fields are accepted and ignored (and logged), as Ollama does.
    model_config = ConfigDict(extra="allow")


def _no_images(value: Any) -> Any:
    if value:
        raise ValueError("images are not supported: this model reads text only")
    return value


class OllamaFunctionCall(OllamaBaseModel):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class OllamaToolCall(OllamaBaseModel):
    function: OllamaFunctionCall


class OllamaMessage(OllamaBaseModel):
    """One message; an assistant's may carry its ``thinking`` and ``tool_calls``, a tool's names its tool."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    thinking: str | None = None
    images: list[Any] | None = None
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None

    _images = field_validator("images")(_no_images)


class OllamaTool(OllamaBaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class OllamaOptions(OllamaBaseModel):
    """The runner options that mean something here; the rest are ignored. ``num_predict``: -1 (the default) no cap,
    -2 fill the context, else the most tokens to generate."""

    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = Field(default=None, ge=_INT64_MIN, le=_INT64_MAX)
    num_predict: int | None = None
    stop: list[str] | str | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    @field_validator("num_predict")
    @classmethod
    def _cap(cls, value: int | None) -> int | None:
        if value is not None and (value == 0 or value < -2):
            raise ValueError("num_predict must be positive, -1 (no limit) or -2 (fill the context)")
        return value


class OllamaGenerationFields(OllamaBaseModel):
    """What ``/api/chat`` and ``/api/generate`` share."""

    model: str = Field(min_length=1)
    format: Literal["", "json"] | dict[str, Any] | None = None
    options: OllamaOptions | None = None
    stream: bool = True
    think: bool | Literal["low", "medium", "high"] | None = None
    keep_alive: str | int | float | None = None

    @field_validator("format")
    @classmethod
    def _schema(cls, value: Any) -> Any:
        if isinstance(value, dict):
            check_json_schema(value, "format")
        return value

    @model_validator(mode="after")
    def _no_logprobs(self) -> OllamaGenerationFields:
        if (self.model_extra or {}).get("logprobs"):
            raise ValueError("logprobs are not supported on the Ollama API; use /v1/chat/completions for them")
        return self


class OllamaChatRequest(OllamaGenerationFields):
    """``POST /api/chat``."""

    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[OllamaTool] | None = None


class OllamaGenerateRequest(OllamaGenerationFields):
    """``POST /api/generate``: one prompt (and an optional system prompt), rendered as a one-turn chat."""

    prompt: str = ""
    system: str | None = None
    images: list[Any] | None = None
    raw: bool = False
    template: str | None = None
    suffix: str | None = None
    context: list[int] | None = None

    _images = field_validator("images")(_no_images)

    @model_validator(mode="after")
    def _supported(self) -> OllamaGenerateRequest:
        if self.raw:
            raise ValueError("raw prompts are not supported here: send raw text to /v1/completions")
        if self.template:
            raise ValueError("template is not supported: DeepSeek-V3.2 prompts are rendered by its own encoding")
        if self.suffix:
            raise ValueError("suffix (fill-in-the-middle) is not supported by this model")
        if self.context:
            raise ValueError("context is not supported: send the conversation to /api/chat")
        return self


class OllamaShowRequest(OllamaBaseModel):
    """``POST /api/show``; ``name`` is the older spelling of ``model``."""

    model: str | None = None
    name: str | None = None
    verbose: bool = False

    @model_validator(mode="after")
    def _named(self) -> OllamaShowRequest:
        if not (self.model or self.name):
            raise ValueError("model is required")
        return self

    @property
    def model_name(self) -> str:
        return self.model or self.name or ""
