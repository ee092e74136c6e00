"""Anthropic's Messages API on the chat path: ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``.

A request is converted into the chat path's ``ChatCompletionRequest`` (``to_chat_request``) and goes where a chat
completion goes (``dsv32.server.chat.start_chat_generation``: rendering, validation, sampling parameters, the
engine); the chat output parser's deltas are turned into Anthropic's content blocks (``ContentBlocks``), streamed as
Anthropic's named SSE events or folded into one message, so the two cannot disagree.

What maps to what:
* ``system`` -> a system message; user ``text`` blocks -> user messages; ``tool_result`` blocks -> tool messages;
  an assistant turn's ``thinking`` -> its ``reasoning_content``, ``text`` -> its content, ``tool_use`` -> its
  ``tool_calls``. A final assistant turn is a prefill the answer continues (``continue_final_message``).
* ``tool_choice`` ``auto`` / ``any`` / ``tool`` / ``none`` -> ``auto`` / ``required`` / the named function /
  ``none`` (``any`` and ``tool`` are enforced by the tool-call grammar); ``disable_parallel_tool_use`` ->
  ``parallel_tool_calls=false``.
* ``thinking`` ``enabled`` / ``adaptive`` -> thinking mode, its reasoning returned as ``thinking`` blocks (with an
  empty ``signature``: nothing here signs them). ``budget_tokens`` is checked but does not cap the thinking on its
  own: the engine has no per-phase budget, ``max_tokens`` bounds thinking and answer together.
* ``stop_reason``: ``tool_use`` when tools were called, ``max_tokens``, ``stop_sequence`` (with ``stop_sequence``
  set) or ``end_turn``. Usage: ``input_tokens`` + ``cache_read_input_tokens`` (the prefix cache's hit) is the
  prompt.
* Errors are ``{"type": "error", "error": {"type", "message"}}`` (registered for these paths with
  ``dsv32.server.errors``, so the request boundary's and the API key's refusals come in this shape too); an error
  after a stream started is an ``error`` event.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from dsv32.encoding import StreamingParser
from dsv32.encoding.stream import ToolCallDelta
from dsv32.engine.outputs import CompletionOutput
from dsv32.server.anthropic_protocol import (
    AnthropicCountTokensRequest,
    AnthropicMessage,
    AnthropicMessagesRequest,
    AnthropicResponse,
    AnthropicTokenCount,
    AnthropicUsage,
)
from dsv32.server.chat import (
    ChatRun,
    chat_finish_reason,
    client_stop_reason,
    in_client_terms,
    render_and_tokenize,
    start_chat_generation,
)
from dsv32.server.errors import APIError, register_error_shape
from dsv32.server.output_runs import Kind, OutputRuns
from dsv32.server.protocol import ChatCompletionRequest
from dsv32.server.sse import named_sse_event, sse_response
from dsv32.server.state import ServerState

MESSAGES_PATH = "/v1/messages"

# Anthropic's error types by HTTP status; other 4xx are invalid requests, other 5xx API errors.
_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                408: "timeout_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error"}


def anthropic_error(error: APIError) -> dict[str, Any]:
    """Anthropic's error envelope."""
    status = error.status_code
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": error.message}}


register_error_shape(MESSAGES_PATH, anthropic_error)
router = APIRouter()


# ---------------------------------------------------------------------------------------------------------------------
# Request: Anthropic -> chat
# ---------------------------------------------------------------------------------------------------------------------


def _chat_messages(message: AnthropicMessage) -> list[dict[str, Any]]:
    """One Anthropic turn as chat messages: an assistant turn stays one message; a user turn's tool results become
    tool messages and its text runs user messages, in their order."""
    if isinstance(message.content, str):
        return [{"role": message.role, "content": message.content}]
    if message.role == "assistant":
        reasoning = [block.thinking for block in message.content if block.type == "thinking"]
        calls = [{"id": block.id, "type": "function", "function": {"name": block.name, "arguments": block.input}}
                 for block in message.content if block.type == "tool_use"]
        chat: dict[str, Any] = {"role": "assistant",
                                "content": "".join(block.text for block in message.content if block.type == "text")}
        if reasoning:
            chat["reasoning_content"] = "".join(reasoning)
        if calls:
            chat["tool_calls"] = calls
        return [chat]
    messages: list[dict[str, Any]] = []
    for block in message.content:
        if block.type == "tool_result":
            messages.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": block.text()})
        elif messages and messages[-1]["role"] == "user":
            messages[-1]["content"] += "\n" + block.text
        else:
            messages.append({"role": "user", "content": block.text})
    return messages


def to_chat_request(request: AnthropicCountTokensRequest) -> tuple[ChatCompletionRequest, list[str]]:
    """The chat request ``request`` means, and for each of its messages the Anthropic field it came from (errors
    about a chat message are reported against that)."""
    messages: list[dict[str, Any]] = []
    origins: list[str] = []
    system = request.system_text()
    if system is not None:
        messages.append({"role": "system", "content": system})
        origins.append("system")
    for index, message in enumerate(request.messages):
        converted = _chat_messages(message)
        messages += converted
        origins += [f"messages[{index}]"] * len(converted)
    prefill = request.messages[-1].role == "assistant"
    fields: dict[str, Any] = {"model": request.model, "messages": messages, "continue_final_message": prefill,
                              "add_generation_prompt": not prefill}
    if request.tools:
        fields["tools"] = [{"type": "function", "function": {
            "name": tool.name, "description": tool.description, "parameters": tool.input_schema}}
            for tool in request.tools]
    choice = request.tool_choice
    if choice is not None:
        fields["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(
            choice.type, {"type": "function", "function": {"name": choice.name}})
        fields["parallel_tool_calls"] = not choice.disable_parallel_tool_use
    if request.thinking is not None:
        fields["thinking"] = {"type": "enabled" if request.thinking.enabled else "disabled"}
    if isinstance(request, AnthropicMessagesRequest):
        fields["max_tokens"] = request.max_tokens
        fields["stop"] = request.stop_sequences
        fields.update(request.sampling_extensions())
        for name in ("temperature", "top_p"):
            if (value := getattr(request, name)) is not None:
                fields[name] = value
    try:
        return ChatCompletionRequest.model_validate(fields), origins
    except ValidationError as exc:  # what the Anthropic model let through but the chat request refuses
        problems = "; ".join(error["msg"].removeprefix("Value error, ") for error in exc.errors())
        raise APIError(problems, 400) from None


# ---------------------------------------------------------------------------------------------------------------------
# Output: parser deltas -> content blocks
# ---------------------------------------------------------------------------------------------------------------------


def tool_use_id(call_id: str) -> str:
    """Anthropic's id style for the parser's tool-call id."""
    return "toolu_" + call_id.removeprefix("call_")


@dataclass
class ContentBlocks(OutputRuns):
    """Anthropic's content-block events (``content_block_start`` / ``_delta`` / ``_stop``) for the chat parser's
    deltas: ``thinking`` blocks for reasoning, ``text`` blocks, a ``tool_use`` block per call (``OutputRuns``)."""

    index: int = -1

    def begin(self, kind: Kind) -> list[dict[str, Any]]:
        return self._open({"type": "thinking", "thinking": "", "signature": ""} if kind == "reasoning"
                          else {"type": "text", "text": ""})

    def text_delta(self, kind: Kind, text: str) -> list[dict[str, Any]]:
        key = "thinking" if kind == "reasoning" else "text"
        return [self._delta({"type": f"{key}_delta", key: text})]

    def start_call(self, call: ToolCallDelta) -> list[dict[str, Any]]:
        return self._open({"type": "tool_use", "id": tool_use_id(call.id or ""), "name": call.name, "input": {}})

    def call_arguments(self, arguments: str) -> list[dict[str, Any]]:
        return [self._delta({"type": "input_json_delta", "partial_json": arguments})]

    def end(self, kind: Kind, status: str) -> list[dict[str, Any]]:
        return [{"type": "content_block_stop", "index": self.index}]

    def _open(self, block: dict[str, Any]) -> list[dict[str, Any]]:
        self.index += 1
        return [{"type": "content_block_start", "index": self.index, "content_block": block}]

    def _delta(self, delta: dict[str, Any]) -> dict[str, Any]:
        return {"type": "content_block_delta", "index": self.index, "delta": delta}


def fold_blocks(events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The content a stream of block events adds up to (what a client accumulating the stream gets)."""
    blocks: list[dict[str, Any]] = []
    arguments: dict[int, str] = {}
    for event in events:
        if event["type"] == "content_block_start":
            blocks.append(dict(event["content_block"]))
        elif event["type"] == "content_block_delta":
            block, delta = blocks[event["index"]], event["delta"]
            if delta["type"] == "input_json_delta":
                arguments[event["index"]] = arguments.get(event["index"], "") + delta["partial_json"]
            else:
                key = delta["type"].removesuffix("_delta")
                block[key] += delta[key]
        elif event["type"] == "content_block_stop" and event["index"] in arguments:
            # The parser closes every call it committed, cut off or not: its arguments are one JSON object.
            blocks[event["index"]]["input"] = json.loads(arguments[event["index"]])
    return blocks


def stop_reason(completion: CompletionOutput, parser: StreamingParser) -> tuple[str, str | None]:
    """Anthropic's ``stop_reason`` and ``stop_sequence`` for a finished completion."""
    reason = chat_finish_reason(completion, parser)
    if reason == "tool_calls":
        return "tool_use", None
    if reason == "length":
        return "max_tokens", None
    if reason == "abort":
        raise APIError("The request was aborted before it finished (the server is shutting down).", 503)
    stop = client_stop_reason(completion)
    return ("stop_sequence", stop) if isinstance(stop, str) else ("end_turn", None)


def _usage(run: ChatRun, cached: int, generated: int) -> AnthropicUsage:
    return AnthropicUsage(input_tokens=run.num_prompt_tokens - cached, output_tokens=generated,
                          cache_read_input_tokens=cached)


def _error_event(error: APIError) -> str:
    return named_sse_event(anthropic_error(error))


@dataclass
class _Generation:
    request: AnthropicMessagesRequest
    run: ChatRun
    model: str

    def blocks(self) -> ContentBlocks:
        thinking = self.request.thinking
        return ContentBlocks(include_text=not self.run.rendered.forces_tool_call,
                             include_reasoning=thinking is None or thinking.display != "omitted")

    def message(self, content: list[dict[str, Any]], reason: str | None, sequence: str | None,
                usage: AnthropicUsage) -> dict[str, Any]:
        return {"id": self.run.request_id, "type": "message", "role": "assistant", "model": self.model,
                "content": content, "stop_reason": reason, "stop_sequence": sequence,
                "usage": usage.model_dump()}

    async def full(self) -> AnthropicResponse:
        step, = await self.run.final()
        blocks = self.blocks()
        content = fold_blocks(blocks.feed(step.deltas) + blocks.close())
        reason, sequence = stop_reason(step.completion, step.parser)
        usage = _usage(self.run, step.num_cached_tokens, step.num_generated)
        return AnthropicResponse.model_validate(self.message(content, reason, sequence, usage))

    async def stream(self) -> AsyncGenerator[str, None]:
        blocks = self.blocks()
        started = False
        async with contextlib.aclosing(self.run.steps()) as steps:
            async for step in steps:
                if not started:
                    # Sent at the first engine output, which start() waited for: it marks the time to first token.
                    started = True
                    usage = _usage(self.run, step.num_cached_tokens, 0)
                    yield named_sse_event({"type": "message_start", "message": self.message([], None, None, usage)})
                for event in blocks.feed(step.deltas):
                    yield named_sse_event(event)
                if step.finished:
                    for event in blocks.close():
                        yield named_sse_event(event)
                    reason, sequence = stop_reason(step.completion, step.parser)
                    usage = _usage(self.run, step.num_cached_tokens, step.num_generated)
                    yield named_sse_event({"type": "message_delta", "delta": {"stop_reason": reason,
                                                                              "stop_sequence": sequence},
                                           "usage": usage.model_dump()})
                    yield named_sse_event({"type": "message_stop"})


# ---------------------------------------------------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------------------------------------------------


@router.post(MESSAGES_PATH)
async def create_message(request: AnthropicMessagesRequest, raw_request: Request) -> Response:
    state: ServerState = raw_request.app.state.server
    chat, origins = to_chat_request(request)
    try:
        run = await start_chat_generation(state, chat, raw_request, id_prefix="msg", logged=request)
    except APIError as exc:
        raise in_client_terms(exc, origins) from None
    generation = _Generation(request, run, state.config.model_name)
    # The SDK reads `request-id`; the OpenAI routes send `X-Request-Id`.
    headers = {"request-id": run.request_id, "X-Request-Id": run.request_id}
    if request.stream:
        return sse_response(generation.stream(), headers=headers, error_event=_error_event, done=None,
                            on_error=state.metrics.count_error)
    return JSONResponse((await generation.full()).model_dump(mode="json"), headers=headers)


@router.post(MESSAGES_PATH + "/count_tokens")
async def count_tokens(request: AnthropicCountTokensRequest, raw_request: Request) -> AnthropicTokenCount:
    """The prompt tokens ``POST /v1/messages`` would send for the same fields (its usage's ``input_tokens`` plus
    ``cache_read_input_tokens``)."""
    state: ServerState = raw_request.app.state.server
    state.check_model(request.model)
    chat, origins = to_chat_request(request)
    size = sum(len(message.text() or "") for message in chat.messages)
    try:
        _, prompt_ids = await state.offload(size, render_and_tokenize, state, chat)
    except APIError as exc:
        raise in_client_terms(exc, origins) from None
    return AnthropicTokenCount(input_tokens=len(prompt_ids))
