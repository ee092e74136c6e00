"""OpenAI's Responses API on the chat path: ``POST /v1/responses``, ``GET`` / ``DELETE /v1/responses/{id}`` and
``POST /v1/responses/{id}/cancel``, as vLLM serves them.

A request is converted into the chat path's ``ChatCompletionRequest`` (``to_chat_request``) and goes where a chat
completion goes (``dsv32.server.chat.start_chat_generation``); the chat output parser's deltas become output items
(``OutputItems``): a ``reasoning`` item per run of thinking, a ``message`` item per run of text, a
``function_call`` item per tool call - streamed as OpenAI's named events with sequence numbers, or folded into one
response object, from the same code so the two cannot disagree.

What maps to what:
* ``instructions`` -> a system message (not carried over by ``previous_response_id``, as OpenAI does); ``input``
  (a string: one user message) -> messages; ``function_call`` items -> the assistant's ``tool_calls``,
  ``function_call_output`` items -> tool messages, ``reasoning`` items -> the next assistant turn's reasoning.
* ``reasoning.effort`` other than "none" -> thinking mode; ``text.format`` -> ``response_format`` (the
  structured-output path); ``max_output_tokens`` -> ``max_tokens``; tools and ``tool_choice`` -> the chat ones.
* ``status``: "completed"; "incomplete" with ``incomplete_details.reason == "max_output_tokens"`` when the length
  cap cut it; "cancelled" when a background response was cancelled.
* ``store`` (the default) keeps the response and its conversation in memory for ``GET``, ``DELETE`` and
  ``previous_response_id``: at most ``--max-stored-responses``, the oldest dropped first (``ResponseStore``).
  ``background`` runs the generation detached from the HTTP request; ``GET`` polls it, ``cancel`` aborts it.
* Errors are OpenAI's envelope; an error after a stream started is an ``error`` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from dsv32.encoding.stream import ToolCallDelta
from dsv32.engine.outputs import CompletionOutput
from dsv32.server.chat import ChatRun, ChatStep, in_client_terms, start_chat_generation
from dsv32.server.errors import APIError
from dsv32.server.output_runs import Kind, OutputRuns
from dsv32.server.protocol import ChatCompletionRequest, random_uuid
from dsv32.server.responses_protocol import (
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionToolChoice,
    InputTokensDetails,
    MessageItem,
    OutputTokensDetails,
    ReasoningItem,
    ResponsesRequest,
    ResponseUsage,
)
from dsv32.server.sse import named_sse_event, sse_response
from dsv32.server.state import ServerState

RESPONSES_PATH = "/v1/responses"
logger = logging.getLogger(__name__)
router = APIRouter()


# ---------------------------------------------------------------------------------------------------------------------
# Request: Responses -> chat
# ---------------------------------------------------------------------------------------------------------------------


def _input_messages(items: str | Sequence[Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """``input`` as chat messages, and for each the input item it came from. Function calls join the assistant
    message before them (or open one); a reasoning item goes to the assistant turn after it."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}], ["input"]
    messages: list[dict[str, Any]] = []
    origins: list[str] = []
    reasoning: list[str] = []

    def assistant(origin: str) -> dict[str, Any]:
        if not (messages and messages[-1]["role"] == "assistant"):
            messages.append({"role": "assistant", "content": ""})
            origins.append(origin)
        if reasoning:
            messages[-1]["reasoning_content"] = "".join(reasoning)
            reasoning.clear()
        return messages[-1]

    for index, item in enumerate(items):
        origin = f"input[{index}]"
        if isinstance(item, ReasoningItem):
            reasoning.append(item.text())
        elif isinstance(item, FunctionCallItem):
            assistant(origin).setdefault("tool_calls", []).append(
                {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}})
        elif isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text()})
            origins.append(origin)
        elif isinstance(item, MessageItem) and item.role == "assistant":
            message = assistant(origin)
            message["content"] += item.text()
        else:
            messages.append({"role": item.role, "content": item.text()})
            origins.append(origin)
    return messages, origins


def to_chat_request(request: ResponsesRequest, history: Sequence[dict[str, Any]] = ()
                    ) -> tuple[ChatCompletionRequest, list[str], list[dict[str, Any]]]:
    """The chat request ``request`` means after the stored conversation ``history``; for each chat message the
    Responses field it came from; and the conversation (history and input, without the instructions) a stored
    response keeps."""
    converted, input_origins = _input_messages(request.input)
    conversation = [*history, *converted]
    if not conversation:
        raise APIError("input must not be empty", 400, param="input")
    messages = list(conversation)
    origins = ["previous_response_id"] * len(history) + input_origins
    if request.instructions is not None:
        messages.insert(0, {"role": "system", "content": request.instructions})
        origins.insert(0, "instructions")
    fields: dict[str, Any] = {"model": request.model, "messages": messages,
                              "parallel_tool_calls": request.parallel_tool_calls, **request.sampling_extensions()}
    if request.tools:
        fields["tools"] = [{"type": "function", "function": tool.model_dump(exclude={"type"}, exclude_none=True)}
                           for tool in request.tools]
    choice = request.tool_choice
    if choice is not None:
        fields["tool_choice"] = ({"type": "function", "function": {"name": choice.name}}
                                 if isinstance(choice, FunctionToolChoice) else choice)
    if request.reasoning is not None:
        fields["thinking"] = request.reasoning.thinking
    if request.text is not None and request.text.format is not None:
        fields["response_format"] = request.text.format.response_format()
    for ours, theirs in (("max_output_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p")):
        if (value := getattr(request, ours)) is not None:
            fields[theirs] = value
    try:
        return ChatCompletionRequest.model_validate(fields), origins, conversation
    except ValidationError as exc:  # what the Responses model let through but the chat request refuses
        problems = "; ".join(error["msg"].removeprefix("Value error, ") for error in exc.errors())
        raise APIError(problems, 400) from None


# ---------------------------------------------------------------------------------------------------------------------
# Output: parser deltas -> output items
# ---------------------------------------------------------------------------------------------------------------------


def _item_id(prefix: str) -> str:
    return f"{prefix}_{random_uuid()}"


@dataclass
class OutputItems(OutputRuns):
    """Responses output items and the stream events that build them (without their sequence numbers) for the chat
    parser's deltas: a ``reasoning`` item per run of thinking, a ``message`` per run of text, a ``function_call`` per
    call (``OutputRuns``). ``items`` is the output so far (each item whole once done)."""

    items: list[dict[str, Any]] = field(default_factory=list)

    @property
    def _open(self) -> dict[str, Any]:
        return self.items[-1]

    def _ids(self) -> dict[str, Any]:
        return {"item_id": self._open["id"], "output_index": len(self.items) - 1}

    def begin(self, kind: Kind) -> list[dict[str, Any]]:
        if kind == "reasoning":
            part: dict[str, Any] = {"type": "reasoning_text", "text": ""}
            item = {"id": _item_id("rs"), "type": "reasoning", "summary": [], "content": [part],
                    "status": "in_progress"}
        else:
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            item = {"id": _item_id("msg"), "type": "message", "role": "assistant", "status": "in_progress",
                    "content": [part]}
        return [*self._start(item), {"type": "response.content_part.added", **self._ids(), "content_index": 0,
                                     "part": dict(part)}]

    def text_delta(self, kind: Kind, text: str) -> list[dict[str, Any]]:
        self._open["content"][0]["text"] += text
        delta = {"type": f"response.{'reasoning_text' if kind == 'reasoning' else 'output_text'}.delta",
                 **self._ids(), "content_index": 0, "delta": text}
        if kind == "text":
            delta["logprobs"] = []
        return [delta]

    def start_call(self, call: ToolCallDelta) -> list[dict[str, Any]]:
        return self._start({"id": _item_id("fc"), "type": "function_call", "status": "in_progress",
                            "call_id": call.id, "name": call.name, "arguments": ""})

    def call_arguments(self, arguments: str) -> list[dict[str, Any]]:
        self._open["arguments"] += arguments
        return [{"type": "response.function_call_arguments.delta", **self._ids(), "delta": arguments}]

    def end(self, kind: Kind, status: str) -> list[dict[str, Any]]:
        item = self._open
        item["status"] = status
        if kind == "call":
            events = [{"type": "response.function_call_arguments.done", **self._ids(), "name": item["name"],
                       "arguments": item["arguments"]}]
        else:
            part = item["content"][0]
            prefix = "reasoning_text" if kind == "reasoning" else "output_text"
            text_done = {"type": f"response.{prefix}.done", **self._ids(), "content_index": 0, "text": part["text"]}
            if kind == "text":
                text_done["logprobs"] = []
            events = [text_done, {"type": "response.content_part.done", **self._ids(), "content_index": 0,
                                  "part": dict(part)}]
        events.append({"type": "response.output_item.done", "output_index": len(self.items) - 1,
                       "item": copy.deepcopy(item)})
        return events

    def _start(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        # The item as announced: no content yet (its parts are added by their own events).
        announced = {**item, "content": []} if "content" in item else dict(item)
        self.items.append(item)
        return [{"type": "response.output_item.added", "output_index": len(self.items) - 1, "item": announced}]


def assistant_message(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The output as the chat assistant message a later turn (``previous_response_id``) replays."""
    message: dict[str, Any] = {"role": "assistant", "content": "".join(
        part["text"] for item in items if item["type"] == "message" for part in item["content"])}
    reasoning = "".join(part["text"] for item in items if item["type"] == "reasoning" for part in item["content"])
    if reasoning:
        message["reasoning_content"] = reasoning
    calls = [{"id": item["call_id"], "type": "function", "function": {"name": item["name"],
                                                                      "arguments": item["arguments"]}}
             for item in items if item["type"] == "function_call"]
    if calls:
        message["tool_calls"] = calls
    return message


def final_status(completion: CompletionOutput) -> tuple[str, dict[str, str] | None]:
    """The response's ``status`` and ``incomplete_details`` for a finished completion."""
    if completion.finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if completion.finish_reason == "abort":
        return "cancelled", None
    return "completed", None


# ---------------------------------------------------------------------------------------------------------------------
# The response object and the store
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class StoredResponse:
    """A response kept for ``GET`` / ``previous_response_id``: the object, the conversation it ended (chat messages,
    its own output included once it finished), and while it runs in the background, the run and its task."""

    body: dict[str, Any]
    conversation: list[dict[str, Any]]
    run: ChatRun | None = None
    task: asyncio.Task[None] | None = None


class ResponseStore:
    """Stored responses by id, at most ``capacity`` (the oldest dropped first; a dropped background run is aborted)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._responses: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._responses)

    def put(self, response_id: str, stored: StoredResponse) -> None:
        if self.capacity == 0:
            return
        self._responses[response_id] = stored
        while len(self._responses) > self.capacity:
            _, dropped = self._responses.popitem(last=False)
            if dropped.task is not None:
                dropped.task.cancel()

    def get(self, response_id: str) -> StoredResponse:
        stored = self._responses.get(response_id)
        if stored is None:
            raise APIError(f"Response with id '{response_id}' not found.", 404, param="response_id")
        return stored

    def pop(self, response_id: str) -> StoredResponse:
        stored = self.get(response_id)
        del self._responses[response_id]
        return stored


def _usage(run: ChatRun, step: ChatStep, token_ids: Sequence[int], think_end_id: int) -> ResponseUsage:
    """Usage as of ``step``; the reasoning tokens are those before ``</think>`` when the answer began thinking."""
    reasoning = 0
    if run.rendered.parser_thinking_mode == "thinking":
        reasoning = token_ids.index(think_end_id) if think_end_id in token_ids else len(token_ids)
    return ResponseUsage(input_tokens=run.num_prompt_tokens,
                         input_tokens_details=InputTokensDetails(cached_tokens=step.num_cached_tokens),
                         output_tokens=step.num_generated, output_tokens_details=OutputTokensDetails(
                             reasoning_tokens=reasoning), total_tokens=run.num_prompt_tokens + step.num_generated)


@dataclass
class _Generation:
    """One response being made: its request, run and identity, and the store it goes to."""

    request: ResponsesRequest
    run: ChatRun
    response_id: str
    created_at: int
    model: str
    store: ResponseStore
    conversation: list[dict[str, Any]]
    think_end_id: int

    def body(self, status: str, output: list[dict[str, Any]], usage: ResponseUsage | None = None,
             incomplete: dict[str, str] | None = None) -> dict[str, Any]:
        request = self.request
        choice = request.tool_choice
        text_format = request.text.format if request.text is not None and request.text.format is not None else None
        return {
            "id": self.response_id, "object": "response", "created_at": self.created_at, "status": status,
            "background": request.background, "error": None, "incomplete_details": incomplete,
            "instructions": request.instructions, "max_output_tokens": request.max_output_tokens,
            "metadata": request.metadata or {}, "model": self.model, "output": output,
            "parallel_tool_calls": request.parallel_tool_calls,
            "previous_response_id": request.previous_response_id,
            "reasoning": {"effort": request.reasoning.effort if request.reasoning else None,
                          "summary": request.reasoning.summary if request.reasoning else None},
            "store": request.store, "temperature": request.temperature,
            "text": {"format": text_format.model_dump(by_alias=True, exclude_none=True) if text_format
                     else {"type": "text"}},
            "tool_choice": choice.model_dump() if isinstance(choice, FunctionToolChoice) else (choice or "auto"),
            "tools": [tool.model_dump(exclude_none=True) for tool in request.tools or []],
            "top_p": request.top_p, "truncation": request.truncation or "disabled",
            "usage": usage.model_dump() if usage is not None else None,
            "user": (request.model_extra or {}).get("user"),
        }

    def items(self) -> OutputItems:
        return OutputItems(include_text=not self.run.rendered.forces_tool_call)

    def finish(self, step: ChatStep, items: OutputItems, token_ids: Sequence[int]) -> tuple[list[dict[str, Any]],
                                                                                              dict[str, Any]]:
        """Close the output after the last step; store the response. Returns the closing events and the body."""
        status, incomplete = final_status(step.completion)
        if step.completion.finish_reason == "abort" and not self.request.background:
            raise APIError("The request was aborted before it finished (the server is shutting down).", 503)
        events = items.close("incomplete" if status == "incomplete" else "completed")
        body = self.body(status, items.items, _usage(self.run, step, token_ids, self.think_end_id), incomplete)
        if self.request.store:
            self.store.put(self.response_id, StoredResponse(body, [*self.conversation,
                                                                   assistant_message(items.items)]))
        return events, body

    async def full(self) -> dict[str, Any]:
        step, = await self.run.final()
        items = self.items()
        items.feed(step.deltas)
        return self.finish(step, items, step.completion.token_ids)[1]

    async def stream(self) -> AsyncGenerator[dict[str, Any], None]:
        """The stream's events, in OpenAI's order, without sequence numbers."""
        start = self.body("in_progress", [])
        yield {"type": "response.created", "response": start}
        yield {"type": "response.in_progress", "response": start}
        items = self.items()
        token_ids: list[int] = []
        async with contextlib.aclosing(self.run.steps()) as steps:
            async for step in steps:
                token_ids += step.completion.token_ids
                for event in items.feed(step.deltas):
                    yield event
                if step.finished:
                    events, body = self.finish(step, items, token_ids)
                    for event in events:
                        yield event
                    kind = "response.incomplete" if body["status"] == "incomplete" else "response.completed"
                    yield {"type": kind, "response": body}

    async def run_in_background(self) -> None:
        """Fold the answer into the stored response (``GET`` polls it); a failure is the response's ``error``."""
        try:
            await self.full()
        except Exception as exc:
            logger.exception("background response %s failed", self.response_id)
            message = exc.message if isinstance(exc, APIError) else f"Internal server error: {type(exc).__name__}"
            with contextlib.suppress(APIError):  # not there any more: deleted, or dropped from the store
                stored = self.store.get(self.response_id)
                stored.body.update(status="failed", error={"code": "server_error", "message": message})
                stored.run = stored.task = None


class _Sequenced:
    """Numbers a stream's events (``sequence_number`` from 0), the error event included."""

    def __init__(self) -> None:
        self.next = 0

    def event(self, payload: dict[str, Any]) -> str:
        payload["sequence_number"] = self.next
        self.next += 1
        return named_sse_event(payload)

    def error(self, error: APIError) -> str:
        return self.event({"type": "error", "code": str(error.status_code), "message": error.message,
                           "param": error.param})

    async def frame(self, events: AsyncGenerator[dict[str, Any], None]) -> AsyncGenerator[str, None]:
        async with contextlib.aclosing(events):
            async for event in events:
                yield self.event(event)


# ---------------------------------------------------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------------------------------------------------


def _store(raw_request: Request) -> ResponseStore:
    return raw_request.app.state.responses


@router.post(RESPONSES_PATH)
async def create_response(request: ResponsesRequest, raw_request: Request) -> Response:
    state: ServerState = raw_request.app.state.server
    store = _store(raw_request)
    if request.background and store.capacity == 0:
        raise APIError("background=true needs stored responses (the server runs with --max-stored-responses 0)",
                       400, param="background")
    history: list[dict[str, Any]] = []
    if request.previous_response_id is not None:
        try:
            previous = store.get(request.previous_response_id)
        except APIError:
            raise APIError(f"Previous response with id '{request.previous_response_id}' not found.", 404,
                           param="previous_response_id") from None
        if previous.task is not None:
            raise APIError(f"Previous response '{request.previous_response_id}' is still in progress.", 400,
                           param="previous_response_id")
        history = previous.conversation
    chat, origins, conversation = to_chat_request(request, history)
    try:
        run = await start_chat_generation(state, chat, raw_request, id_prefix="resp", logged=request,
                                          detached=request.background)
    except APIError as exc:
        raise in_client_terms(exc, origins) from None
    response_id = f"resp_{random_uuid()}"
    generation = _Generation(request, run, response_id, int(time.time()), state.config.model_name, store,
                             conversation, state.tokenizer.think_end_id)
    headers = {"X-Request-Id": run.request_id}
    if request.stream:
        sequenced = _Sequenced()
        return sse_response(sequenced.frame(generation.stream()), headers=headers, error_event=sequenced.error,
                            done=None, on_error=state.metrics.count_error)
    if request.background:
        body = generation.body("in_progress", [])
        task = asyncio.create_task(generation.run_in_background(), name=f"background-{response_id}")
        store.put(response_id, StoredResponse(body, conversation, run, task))
        return JSONResponse(body, headers=headers)
    return JSONResponse(await generation.full(), headers=headers)


@router.get(RESPONSES_PATH + "/{response_id}")
async def retrieve_response(response_id: str, raw_request: Request) -> JSONResponse:
    if raw_request.query_params.get("stream") in ("true", "1"):
        raise APIError("Streaming a stored response again is not supported; retrieve it without stream.", 400,
                       param="stream")
    return JSONResponse(_store(raw_request).get(response_id).body)


@router.delete(RESPONSES_PATH + "/{response_id}")
async def delete_response(response_id: str, raw_request: Request) -> JSONResponse:
    stored = _store(raw_request).pop(response_id)
    if stored.task is not None:  # a background run: stopped, so it does not store its answer again
        stored.task.cancel()
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})


@router.post(RESPONSES_PATH + "/{response_id}/cancel")
async def cancel_response(response_id: str, raw_request: Request) -> JSONResponse:
    """Stop a background response; its status becomes "cancelled" (with what it had generated so far)."""
    stored = _store(raw_request).get(response_id)
    if not stored.body["background"]:
        raise APIError("Only responses created with background=true can be cancelled.", 400, param="response_id")
    run, task = stored.run, stored.task
    if run is not None and task is not None:
        await run.engine_request.abort()
        await asyncio.shield(task)
        stored = _store(raw_request).get(response_id)  # the finished response replaced the running one
    if stored.body["status"] == "completed" or stored.body["status"] == "incomplete":
        raise APIError(f"Response '{response_id}' already finished ({stored.body['status']}); it cannot be "
                       "cancelled.", 400, param="response_id")
    return JSONResponse(stored.body)
