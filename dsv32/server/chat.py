"""``POST /v1/chat/completions``: messages in, the V3.2 prompt out to the engine, and the completion parsed back
into ``reasoning`` / ``content`` / ``tool_calls`` - one response, or SSE chunks in vLLM's order (role, reasoning
deltas, content deltas, tool-call deltas, the finish chunk, the usage chunk, ``[DONE]``).

Prompt rendering and output parsing belong to ``dsv32.encoding``; this module only drives them.
``start_chat_generation`` is the one way a conversation reaches the engine - for this route and for the APIs that
convert their requests into a chat request (Anthropic's, OpenAI Responses, Ollama's) - and its ``ChatRun`` is what
each of them reads its answer from, as the one output parser's deltas. The parser's initial state (inside reasoning
or not) comes from the rendered prompt - does it end in ``<think>`` - never from request flags, so the turn after a
tool result is parsed right (sglang#17551).

``tool_choice`` "required" or a named function (and ``strict`` tools under "auto") constrain the output to DSML
tool calls with a grammar (``ChatEncoding.tool_call_structural_tag``); ``response_format``, ``structured_outputs``
and the ``guided_*`` fields constrain it too (``dsv32.server.sampling``).
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.requests import Request

from dsv32.encoding import ChatEncoding, Delta, StreamingParser, merge_deltas, prepare_chat_request
from dsv32.encoding.encode import DSML_TOKEN
from dsv32.engine.outputs import CompletionOutput, RequestOutput
from dsv32.server.errors import APIError
from dsv32.server.generation import EngineRequest
from dsv32.server.protocol import (
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatLogprobs,
    ChatResponseMessage,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    NamedToolChoice,
    TokenizeRequest,
    ToolCall,
    UsageInfo,
    usage_info,
)
from dsv32.server.sampling import build_sampling_params, structured_outputs_params
from dsv32.server.sse import sse_event, sse_response
from dsv32.server.state import ServerState

# parallel_tool_calls=false without a grammar: generation stops at the end of the first call (SGLang's rule); the
# parser closes the call the stop string cut off.
_INVOKE_END = f"</{DSML_TOKEN}invoke>"


def _chat_encoding(request: ChatCompletionRequest | TokenizeRequest, **chat_fields: Any) -> ChatEncoding:
    try:
        return prepare_chat_request(
            [message.model_dump(exclude_none=True) for message in request.messages or []],
            tools=[tool.model_dump(exclude_none=True) for tool in request.tools] if request.tools else None,
            chat_template_kwargs=request.chat_template_kwargs,
            continue_final_message=request.continue_final_message,
            **chat_fields,
        )
    except ValueError as exc:
        raise APIError(str(exc), 400, param="messages") from None


_CHAT_MESSAGE_INDEX = re.compile(r"^messages\[(\d+)\]")


def in_client_terms(error: APIError, origins: Sequence[str]) -> APIError:
    """A rendering error names a chat message (``messages[3]: ...``); name the field of another API's request it
    was converted from (``origins[i]``: where chat message ``i`` came from)."""
    found = _CHAT_MESSAGE_INDEX.match(error.message)
    if found is None or int(found.group(1)) >= len(origins):
        return error
    origin = origins[int(found.group(1))]
    return APIError(origin + error.message[found.end():], error.status_code, param=origin)


def render_tokenize_prompt(request: TokenizeRequest) -> str:
    """The prompt ``/tokenize`` counts for chat ``messages``: exactly what a chat completion would send."""
    return _chat_encoding(request).prompt


def render_chat_prompt(request: ChatCompletionRequest) -> ChatEncoding:
    """Render the conversation with the V3.2 encoding (a bad conversation is a 400)."""
    tool_choice = request.tool_choice
    return _chat_encoding(
        request,
        tool_choice=tool_choice.model_dump() if isinstance(tool_choice, NamedToolChoice) else tool_choice,
        reasoning_effort=request.reasoning_effort,
        response_format=request.response_format.model_dump(exclude_none=True) if request.response_format else None,
        thinking=request.thinking,
        reasoning=request.reasoning,
    )


def render_and_tokenize(state: ServerState, request: ChatCompletionRequest) -> tuple[ChatEncoding, list[int]]:
    """The rendered conversation and its prompt's token ids: what a generation sends the engine."""
    rendered = render_chat_prompt(request)
    return rendered, state.encode_prompt(rendered.prompt)


@dataclass
class _ChoiceStream:
    """Per-choice streaming state: whether its role chunk went out, and logprobs waiting for a chunk to carry them."""

    started: bool = False
    pending_logprobs: list[Any] = field(default_factory=list)


def chat_finish_reason(completion: CompletionOutput, parser: StreamingParser) -> str | None:
    # A call cut off by max_tokens keeps "length" so the client knows its arguments may be incomplete.
    if completion.finish_reason == "stop" and parser.tools_called:
        return "tool_calls"
    return completion.finish_reason


def client_stop_reason(completion: CompletionOutput) -> int | str | None:
    """The client's own stop string or token; the server's parallel_tool_calls stop is not one."""
    return None if completion.stop_reason == _INVOKE_END else completion.stop_reason


def _delta_message(deltas: Sequence[Delta], include_reasoning: bool, include_content: bool = True
                   ) -> DeltaMessage:
    """Folds one step's parser deltas into one chunk delta (a step may end reasoning and start content).
    ``include_content=False`` drops content: a forced tool call cut off by max_tokens is markup, not an answer."""
    reasoning = "".join(d.reasoning_content for d in deltas if d.reasoning_content is not None)
    content = "".join(d.content for d in deltas if d.content is not None) if include_content else ""
    calls: dict[int, DeltaToolCall] = {}
    for d in deltas:
        call = d.tool_call
        if call is None:
            continue
        existing = calls.get(call.index)
        if existing is None:
            calls[call.index] = DeltaToolCall(
                index=call.index, id=call.id, type="function" if call.id else None,
                function=DeltaFunctionCall(name=call.name, arguments=call.arguments))
        else:
            assert existing.function is not None
            existing.function.arguments = (existing.function.arguments or "") + call.arguments
    reasoning_text = reasoning if (reasoning and include_reasoning) else None
    return DeltaMessage(content=content or None, reasoning=reasoning_text, reasoning_content=reasoning_text,
                        tool_calls=list(calls.values()) or None)


def _echo_text(request: ChatCompletionRequest) -> str:
    """vLLM's chat ``echo``: the last message's content when it is the assistant's (the answer being continued)."""
    last = request.messages[-1]
    return (last.text() or "") if request.echo and last.role == "assistant" else ""


@dataclass
class ChatStep:
    """One choice's share of one engine output, parsed: the engine's delta for it, the parser's deltas for that
    text (the parser's flush included once the choice finished), and the counts as of this output."""

    completion: CompletionOutput
    deltas: list[Delta]
    parser: StreamingParser
    num_generated: int  # tokens generated so far, over every choice
    num_cached_tokens: int

    @property
    def index(self) -> int:
        return self.completion.index

    @property
    def finished(self) -> bool:
        return self.completion.finished

    def finish_reason(self) -> str | None:
        return chat_finish_reason(self.completion, self.parser)


@dataclass
class ChatRun:
    """A started chat generation: the request, its rendering and its engine request. Every API reads its answer
    from here - step by step (``steps``) or whole (``final``) - as the one chat output parser's deltas."""

    request: ChatCompletionRequest
    rendered: ChatEncoding
    engine_request: EngineRequest

    @property
    def request_id(self) -> str:
        return self.engine_request.request_id

    @property
    def num_prompt_tokens(self) -> int:
        return self.engine_request.num_prompt_tokens

    def new_parser(self) -> StreamingParser:
        return self.rendered.new_parser(self.request.separate_reasoning)

    async def steps(self) -> AsyncGenerator[ChatStep, None]:
        """Each engine output's text per choice, parsed; nothing more for a choice once it finished."""
        parsers = [self.new_parser() for _ in range(self.request.n)]
        finished: set[int] = set()
        num_generated = 0
        async with contextlib.aclosing(self.engine_request.outputs()) as outputs:
            async for out in outputs:
                num_generated += _num_generated(out)
                for completion in out.outputs:
                    if completion.index in finished:
                        continue
                    parser = parsers[completion.index]
                    deltas = parser.feed(completion.text) if completion.text else []
                    if completion.finished:
                        finished.add(completion.index)
                        deltas += parser.finish()
                    yield ChatStep(completion, deltas, parser, num_generated, out.num_cached_tokens)

    async def final(self) -> list[ChatStep]:
        """The whole answer: one step per choice, holding its whole completion."""
        final = await self.engine_request.final_output()
        steps = []
        for completion in final.outputs:
            parser = self.new_parser()
            steps.append(ChatStep(completion, [*parser.feed(completion.text), *parser.finish()], parser,
                                  _num_generated(final), final.num_cached_tokens))
        return steps


async def start_chat_generation(state: ServerState, request: ChatCompletionRequest, raw_request: Request,
                                id_prefix: str = "chatcmpl", logged: BaseModel | None = None,
                                detached: bool = False) -> ChatRun:
    """The one way a conversation reaches the engine: checked, rendered, tokenized, its sampling parameters built
    and validated, started. Other APIs (``dsv32.server.anthropic``, ``.responses``, ``.ollama``) convert their
    request into a ``ChatCompletionRequest`` and come here too; ``logged`` is the request as the client sent it, for
    the log. ``detached``: the generation outlives the HTTP request (a background response), so the client hanging
    up does not abort it."""
    state.check_model(request.model)
    tool_choice = request.effective_tool_choice()
    if request.tools and state.config.tool_call_parser == "none" and tool_choice != "none":
        choice_name = tool_choice if isinstance(tool_choice, str) else "named"
        raise APIError(f'"{choice_name}" tool choice requires --tool-call-parser to be set', 400, param="tool_choice")
    size = sum(len(message.text() or "") for message in request.messages)
    rendered, prompt_ids = await state.offload(size, render_and_tokenize, state, request)
    tool_call_tag = rendered.tool_call_structural_tag(request.parallel_tool_calls)
    # parallel_tool_calls=false: a tool-call grammar allows one call; without one, a stop string ends the first.
    single_call = not request.parallel_tool_calls and bool(rendered.tools) and tool_call_tag is None
    params = build_sampling_params(
        request, prompt_ids, state.validator,
        max_tokens=state.max_tokens(request.requested_max_tokens(), len(prompt_ids)),
        logprobs=(request.top_logprobs or 0) if request.logprobs else None,
        extra_stop=[_INVOKE_END] if single_call else [],
        structured_outputs=structured_outputs_params(request, tool_call_tag))
    request_id = state.request_id(id_prefix, raw_request.headers.get("x-request-id"),
                                  request.request_id or request.rid)
    state.log_request(request_id, request if logged is None else logged, len(prompt_ids))
    engine_request = EngineRequest(state, request_id, prompt_ids, params, None if detached else raw_request,
                                   prompt=rendered.prompt)
    await engine_request.start()
    return ChatRun(request, rendered, engine_request)


async def create_chat_completion(state: ServerState, request: ChatCompletionRequest, raw_request: Request) -> Response:
    run = await start_chat_generation(state, request, raw_request)
    created = int(time.time())
    headers = {"X-Request-Id": run.request_id}
    if request.stream:
        return sse_response(_stream(state, run, created), headers=headers, on_error=state.metrics.count_error)
    return JSONResponse((await _full_response(state, run, created)).model_dump(mode="json"), headers=headers)


def _num_generated(out: RequestOutput) -> int:
    return sum(len(c.token_ids) for c in out.outputs)


def _tool_calls(merged: dict[str, Any]) -> list[ToolCall]:
    return [ToolCall(id=call["id"], function=FunctionCall(name=call["function"]["name"],
                                                          arguments=call["function"]["arguments"]))
            for call in merged["tool_calls"]]


async def _full_response(state: ServerState, run: ChatRun, created: int) -> ChatCompletionResponse:
    request, rendered = run.request, run.rendered
    choices: list[ChatCompletionChoice] = []
    steps = await run.final()
    for step in steps:
        completion = step.completion
        merged = merge_deltas(step.deltas)
        reasoning = merged["reasoning_content"] if request.include_reasoning and merged["reasoning_content"] else None
        tool_calls = _tool_calls(merged)
        content = _echo_text(request) + ("" if rendered.forces_tool_call else merged["content"])
        message = ChatResponseMessage(content=content if (content or not (reasoning or tool_calls)) else None,
                                      reasoning=reasoning, reasoning_content=reasoning, tool_calls=tool_calls)
        logprobs = None
        if request.logprobs and completion.logprobs is not None:
            logprobs = ChatLogprobs(content=state.logprobs.chat(completion.token_ids, completion.logprobs,
                                                                request.top_logprobs or 0))
        choices.append(ChatCompletionChoice(index=completion.index, message=message, logprobs=logprobs,
                                            finish_reason=step.finish_reason(),
                                            stop_reason=client_stop_reason(completion)))
    return ChatCompletionResponse(id=run.request_id, created=created, model=state.config.model_name,
                                  choices=choices, usage=usage_info(run.num_prompt_tokens, steps[0].num_generated,
                                                                    steps[0].num_cached_tokens))


async def _stream(state: ServerState, run: ChatRun, created: int) -> AsyncGenerator[str, None]:
    request = run.request
    include_usage = request.stream_options is not None and bool(request.stream_options.include_usage)
    continuous = include_usage and bool(request.stream_options and request.stream_options.continuous_usage_stats)
    choices = [_ChoiceStream() for _ in range(request.n)]
    usage: UsageInfo | None = None  # as of the newest output

    def chunk(index: int, delta: DeltaMessage, finish_reason: str | None = None, stop_reason: Any = None,
              logprobs: ChatLogprobs | None = None) -> str:
        return sse_event(ChatCompletionStreamResponse(
            id=run.request_id, created=created, model=state.config.model_name,
            choices=[ChatCompletionStreamChoice(index=index, delta=delta, logprobs=logprobs,
                                                finish_reason=finish_reason, stop_reason=stop_reason)],
            usage=usage if continuous else None))

    async with contextlib.aclosing(run.steps()) as steps:
        async for step in steps:
            usage = usage_info(run.num_prompt_tokens, step.num_generated, step.num_cached_tokens)
            completion = step.completion
            choice = choices[step.index]
            if not choice.started:
                # Sent at the first engine output so it still marks the time to first token.
                choice.started = True
                yield chunk(step.index, DeltaMessage(role="assistant", content=_echo_text(request)))
            if request.logprobs and completion.logprobs is not None:
                choice.pending_logprobs += state.logprobs.chat(completion.token_ids, completion.logprobs,
                                                               request.top_logprobs or 0)
            delta = _delta_message(step.deltas, request.include_reasoning, not run.rendered.forces_tool_call)
            if not delta.is_empty():
                logprobs = ChatLogprobs(content=choice.pending_logprobs) if choice.pending_logprobs else None
                choice.pending_logprobs = []
                yield chunk(step.index, delta, logprobs=logprobs)
            if step.finished:
                logprobs = ChatLogprobs(content=choice.pending_logprobs) if choice.pending_logprobs else None
                yield chunk(step.index, DeltaMessage(), finish_reason=step.finish_reason(),
                            stop_reason=client_stop_reason(completion), logprobs=logprobs)
    if include_usage and usage is not None:
        yield sse_event(ChatCompletionStreamResponse(id=run.request_id, created=created,
                                                     model=state.config.model_name, choices=[], usage=usage))
