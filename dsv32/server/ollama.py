"""Ollama's native API on the chat path: ``POST /api/chat`` and ``/api/generate``, ``GET /api/tags``, ``/api/ps``,
``/api/version`` and ``POST /api/show``, for clients written against Ollama.

A chat (or a generate, as a one-turn chat of ``system`` + ``prompt``) is converted into the chat path's
``ChatCompletionRequest`` and goes where a chat completion goes (``dsv32.server.chat.start_chat_generation``); the chat
output parser's deltas become Ollama's message fields (``OllamaMessageParts``): ``content``, ``thinking``, and
``tool_calls`` with their arguments as JSON objects, each call sent whole once its arguments are.

What maps to what:
* ``think`` true / false -> thinking mode on / off ("low" / "medium" / "high" -> ``reasoning_effort``); unset: chat
  mode, V3.2's default. ``format`` "json" / a schema -> ``response_format`` (the structured-output path).
* ``options``: ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``seed``, ``stop``, ``repeat_penalty``,
  ``presence_penalty``, ``frequency_penalty``, ``num_predict`` (-1 and -2: no cap but the context); the others are
  ignored, as Ollama ignores what its runner does not use. ``keep_alive`` is accepted: the model stays loaded.
* Streaming (``stream`` defaults to true, as in Ollama) is NDJSON, one object per line; the last has ``done: true``,
  ``done_reason`` ("stop" / "length"; "load" for an empty conversation, which only loads the model in Ollama) and the
  timings in nanoseconds: ``prompt_eval_duration`` until the first token, ``eval_duration`` after it,
  ``load_duration`` 0 (the checkpoint is loaded at start). ``prompt_eval_count`` counts the prompt tokens evaluated
  (the prefix cache's hits are not, as in Ollama), ``eval_count`` the generated ones.
* Model management (``/api/pull``, ``create``, ``push``, ``copy``, ``delete``) and embeddings (``/api/embed``) are a
  400: dsv32 serves the one checkpoint it was started with. Errors are Ollama's ``{"error": "message"}`` on every
  ``/api`` path (registered with ``dsv32.server.errors``); an error after a stream started is such a line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from dsv32.encoding import Delta
from dsv32.server.chat import ChatRun, ChatStep, in_client_terms, start_chat_generation
from dsv32.server.errors import APIError, register_error_shape
from dsv32.server.ollama_protocol import (
    OllamaChatRequest,
    OllamaGenerateRequest,
    OllamaGenerationFields,
    OllamaMessage,
    OllamaShowRequest,
)
from dsv32.server.protocol import ChatCompletionRequest
from dsv32.server.sse import sse_response
from dsv32.server.state import ServerState

API_PATH = "/api"
NDJSON = "application/x-ndjson"
_NOT_SUPPORTED = "not supported: dsv32 loads a checkpoint given at start"


def ollama_error(error: APIError) -> dict[str, Any]:
    """Ollama's error body."""
    return {"error": error.message}


register_error_shape(API_PATH, ollama_error)
router = APIRouter()


# ---------------------------------------------------------------------------------------------------------------------
# The model as Ollama describes it
# ---------------------------------------------------------------------------------------------------------------------


def untagged(model: str) -> str:
    """The served name an Ollama model name means (Ollama's default tag ``:latest`` may be given)."""
    return model.removesuffix(":latest")


def check_model(state: ServerState, model: str) -> None:
    """A 404 unless ``model`` names the served model."""
    state.check_model(untagged(model))


def _tagged(name: str) -> str:
    return name if ":" in name else f"{name}:latest"


def _model_card(state: ServerState, name: str) -> dict[str, Any]:
    """An entry of ``/api/tags`` and ``/api/ps``: the served name, the checkpoint's size on disk, an identifying
    digest (of the checkpoint path: there is no Ollama manifest) and its details."""
    checkpoint = Path(state.config.model_path)
    size = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors")) if checkpoint.is_dir() else 0
    modified = datetime.fromtimestamp(checkpoint.stat().st_mtime, UTC) if checkpoint.exists() else datetime.now(UTC)
    return {"name": _tagged(name), "model": _tagged(name), "modified_at": modified.isoformat(), "size": size,
            "digest": hashlib.sha256(str(checkpoint.resolve()).encode()).hexdigest(), "details": _details(state)}


def _details(state: ServerState) -> dict[str, Any]:
    config = state.engine.model_config
    family = "deepseek_v32" if config.has_indexer else "deepseek_v3"
    quantization = config.quantization.quant_method.upper() if config.quantization else config.torch_dtype.upper()
    return {"parent_model": "", "format": "safetensors", "family": family, "families": [family],
            "parameter_size": "", "quantization_level": quantization}


# ---------------------------------------------------------------------------------------------------------------------
# Request: Ollama -> chat
# ---------------------------------------------------------------------------------------------------------------------


def chat_messages(messages: Sequence[OllamaMessage]) -> list[dict[str, Any]]:
    """Ollama's messages as chat messages (tool results are matched to the calls by their order, as the V3.2
    format renders them)."""
    return [_chat_message(message) for message in messages]


def _chat_message(message: OllamaMessage) -> dict[str, Any]:
    chat: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.role == "assistant":
        if message.thinking:
            chat["reasoning_content"] = message.thinking
        if message.tool_calls:
            chat["tool_calls"] = [{"type": "function", "function": {"name": call.function.name,
                                                                    "arguments": call.function.arguments}}
                                  for call in message.tool_calls]
    return chat


def to_chat_request(request: OllamaGenerationFields, messages: list[dict[str, Any]],
                    tools: Sequence[Any] | None = None) -> ChatCompletionRequest:
    """The chat request of ``messages`` with ``request``'s thinking, format and options."""
    fields: dict[str, Any] = {"model": untagged(request.model), "messages": messages}
    if tools:
        fields["tools"] = [tool.model_dump(exclude_none=True) for tool in tools]
    if isinstance(request.think, bool):
        fields["thinking"] = request.think
    elif request.think is not None:
        fields["reasoning_effort"] = request.think
    if request.format == "json":
        fields["response_format"] = {"type": "json_object"}
    elif isinstance(request.format, dict):
        fields["response_format"] = {"type": "json_schema", "json_schema": {"name": "format",
                                                                            "schema": request.format}}
    options = request.options
    if options is not None:
        for name in ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "presence_penalty",
                     "frequency_penalty"):
            if (value := getattr(options, name)) is not None:
                fields[name] = value
        if options.repeat_penalty is not None:
            fields["repetition_penalty"] = options.repeat_penalty
        if options.num_predict is not None and options.num_predict > 0:
            fields["max_tokens"] = options.num_predict
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValidationError as exc:  # what the Ollama model let through but the chat request refuses
        problems = "; ".join(error["msg"].removeprefix("Value error, ") for error in exc.errors())
        raise APIError(problems, 400) from None


# ---------------------------------------------------------------------------------------------------------------------
# Output: parser deltas -> Ollama message fields
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class OllamaMessageParts:
    """Folds the chat parser's deltas into an Ollama message's fields, step by step: text and thinking as they come,
    each tool call whole (arguments as a JSON object) once its arguments are complete - at the next call's start or
    at the end - as Ollama sends calls."""

    include_content: bool = True  # False: a forced tool call; any text is markup the grammar cut off, not an answer
    pending: dict[str, Any] | None = None
    calls_sent: int = 0
    _done: list[dict[str, Any]] = field(default_factory=list)

    def feed(self, deltas: Sequence[Delta], finished: bool) -> dict[str, Any]:
        content: list[str] = []
        thinking: list[str] = []
        for delta in deltas:
            if delta.reasoning_content:
                thinking.append(delta.reasoning_content)
            elif delta.content and self.include_content:
                content.append(delta.content)
            elif delta.tool_call is not None:
                call = delta.tool_call
                if call.id is not None:
                    self._complete()
                    self.pending = {"id": call.id, "name": call.name, "arguments": ""}
                if self.pending is not None:
                    self.pending["arguments"] += call.arguments
        if finished:
            self._complete()
        message: dict[str, Any] = {"role": "assistant", "content": "".join(content)}
        if thinking:
            message["thinking"] = "".join(thinking)
        if self._done:
            message["tool_calls"], self._done = self._done, []
        return message

    def _complete(self) -> None:
        if self.pending is None:
            return
        call, self.pending = self.pending, None
        # The parser closes every call it committed, cut off or not: its arguments are one JSON object.
        self._done.append({"id": call["id"], "function": {"index": self.calls_sent, "name": call["name"],
                                                          "arguments": json.loads(call["arguments"] or "{}")}})
        self.calls_sent += 1


def _created_at() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _done_reason(step: ChatStep) -> str:
    reason = step.completion.finish_reason
    if reason == "abort":
        raise APIError("The request was aborted before it finished (the server is shutting down).", 503)
    return "length" if reason == "length" else "stop"


@dataclass
class _Generation:
    """One chat or generate answer: the run, the name the client asked for, when it started and got its first
    token, and where its message goes (``message`` for chat, ``response`` / ``thinking`` for generate)."""

    run: ChatRun
    model: str
    chat: bool
    started_ns: int
    first_token_ns: int

    def chunk(self, message: dict[str, Any], done: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "created_at": _created_at()}
        if self.chat:
            body["message"] = message
        else:
            body["response"] = message["content"]
            if "thinking" in message:
                body["thinking"] = message["thinking"]
        body["done"] = done
        return body

    def last(self, message: dict[str, Any], step: ChatStep) -> dict[str, Any]:
        now = time.perf_counter_ns()
        return {**self.chunk(message, True), "done_reason": _done_reason(step),
                "total_duration": now - self.started_ns, "load_duration": 0,
                "prompt_eval_count": self.run.num_prompt_tokens - step.num_cached_tokens,
                "prompt_eval_duration": self.first_token_ns - self.started_ns, "eval_count": step.num_generated,
                "eval_duration": now - self.first_token_ns}

    def parts(self) -> OllamaMessageParts:
        return OllamaMessageParts(include_content=not self.run.rendered.forces_tool_call)

    async def full(self) -> dict[str, Any]:
        step, = await self.run.final()
        return self.last(self.parts().feed(step.deltas, finished=True), step)

    async def stream(self) -> AsyncGenerator[str, None]:
        parts = self.parts()
        async with contextlib.aclosing(self.run.steps()) as steps:
            async for step in steps:
                message = parts.feed(step.deltas, step.finished)
                if message["content"] or "thinking" in message or "tool_calls" in message:
                    yield _line(self.chunk(message, False))
                if step.finished:  # as Ollama's: an empty message with the reason and the counts
                    yield _line(self.last({"role": "assistant", "content": ""}, step))


def _line(body: dict[str, Any]) -> str:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")) + "\n"


def _error_line(error: APIError) -> str:
    return _line(ollama_error(error))


async def _answer(state: ServerState, request: OllamaGenerationFields, chat: ChatCompletionRequest,
                  origins: Sequence[str], raw_request: Request, is_chat: bool) -> Response:
    started_ns = time.perf_counter_ns()
    try:
        run = await start_chat_generation(state, chat, raw_request, id_prefix="ollama", logged=request)
    except APIError as exc:
        raise in_client_terms(exc, origins) from None
    generation = _Generation(run, request.model, is_chat, started_ns, time.perf_counter_ns())
    headers = {"X-Request-Id": run.request_id}
    if request.stream:
        return sse_response(generation.stream(), headers=headers, error_event=_error_line, done=None,
                            on_error=state.metrics.count_error, media_type=NDJSON)
    return JSONResponse(await generation.full(), headers=headers)


def _loaded(state: ServerState, request: OllamaGenerationFields, is_chat: bool) -> JSONResponse:
    """An empty conversation only loads the model in Ollama: done at once, ``done_reason`` "load"."""
    check_model(state, request.model)
    body: dict[str, Any] = {"model": request.model, "created_at": _created_at()}
    body.update({"message": {"role": "assistant", "content": ""}} if is_chat else {"response": ""})
    return JSONResponse({**body, "done": True, "done_reason": "load"})


# ---------------------------------------------------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------------------------------------------------


@router.post(API_PATH + "/chat")
async def chat(request: OllamaChatRequest, raw_request: Request) -> Response:
    state: ServerState = raw_request.app.state.server
    if not request.messages:
        return _loaded(state, request, is_chat=True)
    messages = chat_messages(request.messages)
    chat_request = to_chat_request(request, messages, request.tools)
    return await _answer(state, request, chat_request, [f"messages[{i}]" for i in range(len(messages))],
                         raw_request, is_chat=True)


@router.post(API_PATH + "/generate")
async def generate(request: OllamaGenerateRequest, raw_request: Request) -> Response:
    state: ServerState = raw_request.app.state.server
    if not request.prompt:
        return _loaded(state, request, is_chat=False)
    messages = [{"role": "user", "content": request.prompt}]
    origins = ["prompt"]
    if request.system:
        messages.insert(0, {"role": "system", "content": request.system})
        origins.insert(0, "system")
    return await _answer(state, request, to_chat_request(request, messages), origins, raw_request, is_chat=False)


@router.get(API_PATH + "/tags")
async def tags(raw_request: Request) -> dict[str, Any]:
    state: ServerState = raw_request.app.state.server
    return {"models": [_model_card(state, name) for name in state.config.served_model_names]}


@router.get(API_PATH + "/ps")
async def running(raw_request: Request) -> dict[str, Any]:
    """The served model, loaded for as long as the server runs."""
    state: ServerState = raw_request.app.state.server
    forever = (datetime.now(UTC) + timedelta(days=365 * 100)).isoformat()
    models = []
    for name in state.config.served_model_names:
        card = _model_card(state, name)
        models.append({**card, "expires_at": forever, "size_vram": card["size"],
                       "context_length": state.max_model_len})
    return {"models": models}


@router.post(API_PATH + "/show")
async def show(request: OllamaShowRequest, raw_request: Request) -> dict[str, Any]:
    state: ServerState = raw_request.app.state.server
    check_model(state, request.model_name)
    config = state.engine.model_config
    family = _details(state)["family"]
    capabilities = ["completion"]
    if state.config.tool_call_parser != "none":
        capabilities.append("tools")
    if state.config.reasoning_parser != "none":
        capabilities.append("thinking")
    return {
        "modelfile": "", "parameters": "", "template": "", "license": "",
        "details": _details(state),
        "model_info": {"general.architecture": family, f"{family}.context_length": state.max_model_len,
                       f"{family}.embedding_length": config.hidden_size,
                       f"{family}.block_count": config.num_hidden_layers,
                       f"{family}.vocab_size": config.vocab_size},
        "capabilities": capabilities,
        "modified_at": _model_card(state, request.model_name)["modified_at"],
    }


@router.get(API_PATH + "/version")
async def version(raw_request: Request) -> dict[str, str]:
    return {"version": raw_request.app.version}


def _refusal(message: str):  # noqa: ANN202 - a route handler
    async def refuse() -> Response:
        raise APIError(message, 400)
    return refuse


_EMBEDDINGS = "not supported: dsv32 serves a text-generation model, not an embedding model"
for _path, _method, _message in (("/pull", "POST", _NOT_SUPPORTED), ("/create", "POST", _NOT_SUPPORTED),
                                 ("/push", "POST", _NOT_SUPPORTED), ("/copy", "POST", _NOT_SUPPORTED),
                                 ("/delete", "DELETE", _NOT_SUPPORTED), ("/embed", "POST", _EMBEDDINGS),
                                 ("/embeddings", "POST", _EMBEDDINGS)):
    router.add_api_route(API_PATH + _path, _refusal(_message), methods=[_method],
                         responses={400: {"description": _message}})
