"""``POST /v1/completions``: raw prompts (a string, token ids, or a batch of either) in, text completions out,
with ``echo`` and legacy ``logprobs`` (prompt logprobs too when echoing), streamed or not.

A batch of prompts becomes one engine request per prompt; choice ``index`` is ``prompt_index * n + i`` in prompt
order, as vLLM numbers them. ``max_tokens=0`` with ``echo`` scores the prompt without generating (lm-eval's
loglikelihood requests): the engine generates one token, which is dropped.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator

from fastapi.responses import JSONResponse, Response
from starlette.requests import Request

from dsv32.engine.outputs import CompletionOutput, RequestOutput
from dsv32.server.errors import APIError
from dsv32.server.generation import EngineRequest, admit_all, merge_outputs, start_all
from dsv32.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
    usage_info,
)
from dsv32.server.sampling import build_sampling_params, structured_outputs_params
from dsv32.server.sse import sse_event, sse_response
from dsv32.server.state import ServerState


class _PromptRun:
    """One prompt of the batch: its ids, its engine request, the usage counts of the outputs read so far, and (when
    streaming) where each completion's stream stands."""

    def __init__(self, text: str, token_ids: list[int], score_only: bool, request: EngineRequest) -> None:
        self.text = text
        self.token_ids = token_ids
        self.score_only = score_only
        self.request = request
        self.num_generated = 0  # tokens the client gets, over all completions
        self.num_cached_tokens = 0
        # Per completion index: whether its first chunk (the echo) went out, the logprobs text offset of its next
        # token, and whether its finish chunk went out.
        self.started: set[int] = set()
        self.next_offset: dict[int, int] = {}
        self.finished: set[int] = set()

    def observe(self, out: RequestOutput) -> None:
        """Count one output (a delta) into the usage."""
        self.num_generated += sum(len(_visible(self, c)[1]) for c in out.outputs)
        self.num_cached_tokens = out.num_cached_tokens


async def _tokenize_prompts(state: ServerState, request: CompletionRequest) -> list[tuple[str, list[int]]]:
    """Each prompt's text and ids (a long batch is tokenized off the event loop)."""
    size = sum(len(p) for p in request.prompts())
    return await state.offload(size, _tokenize_prompts_now, state, request)


def _tokenize_prompts_now(state: ServerState, request: CompletionRequest) -> list[tuple[str, list[int]]]:
    prompts: list[tuple[str, list[int]]] = []
    for prompt in request.prompts():
        if isinstance(prompt, str):
            prompts.append((prompt, state.encode_prompt(prompt, request.add_special_tokens)))
        else:
            state.validator.check_token_ids(prompt, "prompt")  # the tokenizer decodes only ids it has
            prompts.append((state.tokenizer.decode(prompt, skip_special_tokens=False), list(prompt)))
        if not prompts[-1][1]:
            raise APIError("Prompt cannot be empty.", 400, param="prompt")
    return prompts


def _visible(run: _PromptRun, completion: CompletionOutput) -> tuple[str, list[int]]:
    """The generated text and ids the client gets: nothing when only the prompt was to be scored."""
    if run.score_only:
        return "", []
    return completion.text, completion.token_ids


def _finish_reason(run: _PromptRun, completion: CompletionOutput) -> str | None:
    # Scoring a prompt "ran out" of its zero-token budget: vLLM reports "length".
    return "length" if run.score_only and completion.finish_reason == "stop" else completion.finish_reason


async def create_completion(state: ServerState, request: CompletionRequest, raw_request: Request) -> Response:
    state.check_model(request.model)
    request_id = state.request_id("cmpl", raw_request.headers.get("x-request-id"), request.request_id or request.rid)
    runs: list[_PromptRun] = []
    structured_outputs = structured_outputs_params(request)
    prompts = await _tokenize_prompts(state, request)
    # A batch is admitted as one unit: all of its prompts wait, or none.
    admitted = len(prompts) > 1
    if admitted:
        admit_all(state, len(prompts) * request.n)
    for index, (text, token_ids) in enumerate(prompts):
        score_only = request.max_tokens == 0
        want_prompt_logprobs = request.logprobs if request.echo and request.logprobs is not None else None
        params = build_sampling_params(
            request, token_ids, state.validator,
            max_tokens=state.max_tokens(1 if score_only else request.max_tokens, len(token_ids)),
            logprobs=request.logprobs,
            prompt_logprobs=request.prompt_logprobs if request.prompt_logprobs is not None else want_prompt_logprobs,
            structured_outputs=structured_outputs)
        sub_id = request_id if len(request.prompts()) == 1 else f"{request_id}-{index}"
        state.log_request(sub_id, request, len(token_ids))
        engine_request = EngineRequest(state, sub_id, token_ids, params, raw_request, prompt=text, admitted=admitted)
        runs.append(_PromptRun(text, token_ids, score_only, engine_request))
    await start_all(_requests(runs))
    created = int(time.time())
    if request.stream:
        return sse_response(_stream(state, request, runs, request_id, created), headers={"X-Request-Id": request_id},
                            on_error=state.metrics.count_error)
    return await _full_response(state, request, runs, request_id, created)


def _echo_prefix(state: ServerState, request: CompletionRequest, run: _PromptRun, out: RequestOutput,
                 logprobs: CompletionLogprobs | None) -> str:
    """The prompt text for ``echo``, adding the prompt tokens' logprobs (first one null) to ``logprobs``."""
    if not request.echo:
        return ""
    if logprobs is not None and out.prompt_logprobs is not None:
        state.logprobs.completion(run.token_ids, out.prompt_logprobs, request.logprobs or 0, logprobs, text_offset=0)
    return run.text


def _requests(runs: list[_PromptRun]) -> list[EngineRequest]:
    return [run.request for run in runs]


def _usage(runs: list[_PromptRun]) -> UsageInfo:
    prompt = sum(len(run.token_ids) for run in runs)
    return usage_info(prompt, sum(run.num_generated for run in runs), sum(run.num_cached_tokens for run in runs))


async def _full_response(state: ServerState, request: CompletionRequest, runs: list[_PromptRun], request_id: str,
                         created: int) -> Response:
    finals: dict[int, RequestOutput] = {}  # per prompt, its deltas folded into its first output
    async with contextlib.aclosing(merge_outputs(_requests(runs))) as outputs:
        async for position, out in outputs:
            runs[position].observe(out)
            if position in finals:
                finals[position].add(out)
            else:
                finals[position] = out
    choices: list[CompletionChoice] = []
    for prompt_index, run in enumerate(runs):
        final = finals[prompt_index]
        for completion in final.outputs:
            text, token_ids = _visible(run, completion)
            logprobs = CompletionLogprobs() if request.logprobs is not None else None
            prefix = _echo_prefix(state, request, run, final, logprobs)
            if logprobs is not None and completion.logprobs is not None:
                state.logprobs.completion(token_ids, completion.logprobs, request.logprobs or 0, logprobs)
            prompt_logprobs = (state.logprobs.prompt_logprobs(final.prompt_logprobs)
                               if request.prompt_logprobs is not None and final.prompt_logprobs else None)
            choices.append(CompletionChoice(index=prompt_index * request.n + completion.index, text=prefix + text,
                                            logprobs=logprobs, finish_reason=_finish_reason(run, completion),
                                            stop_reason=completion.stop_reason, prompt_logprobs=prompt_logprobs))
    choices.sort(key=lambda choice: choice.index)
    response = CompletionResponse(id=request_id, created=created, model=state.config.model_name, choices=choices,
                                  usage=_usage(runs))
    return JSONResponse(response.model_dump(mode="json"), headers={"X-Request-Id": request_id})


async def _stream(state: ServerState, request: CompletionRequest, runs: list[_PromptRun], request_id: str,
                  created: int) -> AsyncGenerator[str, None]:
    include_usage = request.stream_options is not None and bool(request.stream_options.include_usage)
    continuous = include_usage and bool(request.stream_options and request.stream_options.continuous_usage_stats)

    def chunk(choice: CompletionChoice) -> str:
        usage = _usage(runs) if continuous else None
        return sse_event(CompletionResponse(id=request_id, created=created, model=state.config.model_name,
                                            choices=[choice], usage=usage))

    async with contextlib.aclosing(merge_outputs(_requests(runs))) as outputs:
        async for position, out in outputs:
            run = runs[position]
            run.observe(out)
            for completion in out.outputs:
                if completion.index in run.finished:
                    continue  # n > 1: this one ended in an earlier step while its siblings go on
                first = completion.index not in run.started
                run.started.add(completion.index)
                delta_text, token_ids = _visible(run, completion)
                logprobs = CompletionLogprobs() if request.logprobs is not None else None
                # Every completion is in the request's first output, which carries the prompt logprobs for echo.
                prefix = _echo_prefix(state, request, run, out, logprobs) if first else ""
                if logprobs is not None and completion.logprobs is not None:
                    run.next_offset[completion.index] = state.logprobs.completion(
                        token_ids, completion.logprobs, request.logprobs or 0, logprobs,
                        text_offset=None if prefix else run.next_offset.get(completion.index, 0))
                finish_reason = _finish_reason(run, completion)
                if finish_reason:
                    run.finished.add(completion.index)
                if not (prefix or delta_text or finish_reason or (logprobs and logprobs.tokens)):
                    continue
                yield chunk(CompletionChoice(index=position * request.n + completion.index, text=prefix + delta_text,
                                             logprobs=logprobs, finish_reason=finish_reason,
                                             stop_reason=completion.stop_reason if finish_reason else None))
    if include_usage:
        yield sse_event(CompletionResponse(id=request_id, created=created, model=state.config.model_name,
                                           choices=[], usage=_usage(runs)))
