"""The engine core shared by the offline ``LLM`` and the server's engine clients: requests in, ``RequestOutput``
deltas out.

One ``step()`` = schedule -> run the model and sample -> advance every sequence -> turn new tokens into text, check
stop conditions, free finished sequences' blocks -> report. A report is a delta: per request only what it gained
since its previous report (new text, token ids, logprob entries, prompt-logprob positions; the finish fields are
absolute), cut from per-sequence cursors, never a rebuild of the whole answer. Logprob entries carry ids, floats and
ranks; their token strings are decoded where they are read (the API server, the offline ``LLM``). It is synchronous
and not thread-safe: its owner calls every method from one thread at a time.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace

from dsv32.config import ConfigError, EngineConfig, ModelConfig
from dsv32.engine.block_manager import BlockPool, make_block_pool
from dsv32.engine.detokenizer import IncrementalDetokenizer, StopChecker
from dsv32.engine.executor import make_executor
from dsv32.engine.outputs import CompletionOutput, EngineStats, RequestOutput, SpecDecodeStats
from dsv32.engine.request import Request, TokenSequence, child_sampling_params
from dsv32.engine.runner import ModelRunner, SampledToken, resolve_device
from dsv32.engine.sampler import make_generator
from dsv32.engine.sampling_params import SamplingParams
from dsv32.engine.scheduler import Scheduler, SchedulerOutput, estimate_context_cost_tokens
from dsv32.engine.spec_decode import MTPProposer
from dsv32.engine.structured_output import StructuredOutputManager
from dsv32.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# How long an idle step waits for a structured-output grammar to compile before returning.
COMPILE_WAIT_SECONDS = 0.05


@dataclass
class _CompletionState:
    """Output side of one sequence: incremental detokenizer, stop-string checker, and where its next report starts
    (the text made since the last one; how many output tokens and logprob entries were reported)."""

    detokenizer: IncrementalDetokenizer
    stop_checker: StopChecker
    new_text: str = ""
    num_tokens_reported: int = 0
    num_logprobs_reported: int = 0


class EngineCore:
    """Model + tokenizer + KV cache + scheduler, driven one step at a time."""

    def __init__(self, engine_config: EngineConfig, model_config: ModelConfig | None = None,
                 on_worker_death: Callable[[str], None] | None = None) -> None:
        """``model_config`` overrides the one read from ``engine_config.model`` (a preset variant built in code,
        e.g. the tiny model as dense-MLA V3). With ``tensor_parallel_size > 1`` this process drives the model's
        worker processes; ``on_worker_death`` is called (from another thread) if one dies while the engine idles."""
        self.engine_config = engine_config
        self.model_config = model_config or ModelConfig.from_pretrained(engine_config.model)
        self.tokenizer = Tokenizer.from_pretrained(engine_config.tokenizer or engine_config.model)
        self.device = resolve_device(engine_config.device)
        num_spec = engine_config.num_speculative_tokens
        if num_spec and self.model_config.num_nextn_predict_layers < 1:
            raise ConfigError("speculative_config: method 'mtp' needs the checkpoint's MTP layer, but its config.json "
                              "has num_nextn_predict_layers = 0")
        self.executor = make_executor(engine_config, self.model_config, self.device, on_worker_death)
        # The offline LLM has no shutdown call: what the executor started is stopped when the engine goes (or at
        # exit), unless ``close`` did it first.
        self._close_executor = weakref.finalize(self, self.executor.close)
        self.structured_output = StructuredOutputManager(self.tokenizer, self.model_config.vocab_size,
                                                         engine_config.structured_outputs_config)
        proposer = MTPProposer(num_spec) if num_spec else None
        self.runner = ModelRunner(self.executor.model, engine_config, self.device, self.tokenizer.eos_token_id,
                                  self.structured_output, proposer)
        self.max_model_len = self.runner.max_model_len
        self.weight_bytes = self.executor.model.weight_bytes()
        self.block_manager: BlockPool = make_block_pool(engine_config, self.runner.num_blocks)
        self.scheduler = Scheduler(self.block_manager, engine_config.max_num_seqs,
                                   engine_config.max_num_batched_tokens, is_ready=self.structured_output.is_ready,
                                   num_speculative_tokens=num_spec,
                                   context_cost_tokens=estimate_context_cost_tokens(self.model_config))
        self.spec_decode_stats = SpecDecodeStats() if num_spec else None
        self._requests: dict[str, Request] = {}
        self._completions: dict[TokenSequence, _CompletionState] = {}
        self._failures: dict[str, Exception] = {}
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0

    # ---- requests -----------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None, stream: bool = True) -> None:
        """Queue a request, validated by whoever took it in (``RequestValidator``: the server, the offline ``LLM``).
        ``ValueError`` (the request fails alone) for what the core still cannot take: a duplicate id, a
        structured-output spec that does not compile (only the engine has the grammar library), or a request that
        would break a step (``_check_servable``). ``max_tokens`` is capped to what the context has left."""
        if request_id in self._requests:
            raise ValueError(f"Request id {request_id!r} is already running")
        self._check_servable(prompt_token_ids, params)
        self.structured_output.validate(params)
        prompt_token_ids = list(prompt_token_ids)
        room = self.max_model_len - len(prompt_token_ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        request = Request(request_id, prompt, prompt_token_ids, params, stream=stream)
        try:
            self._add_sequences(request, max_tokens)
        except Exception:
            # Nothing of a request that could not be added stays behind (its first sequences may be queued).
            for seq in request.sequences:
                self.scheduler.finish(seq, "abort")
                self._completions.pop(seq, None)
                self.structured_output.remove(seq)
            raise
        self._requests[request_id] = request
        self._prompt_tokens_total += len(prompt_token_ids)

    def _check_servable(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Not a second validation: only what would fail a step, and with it every request in the engine, if a
        request skipped ``RequestValidator`` (an engine client used directly): a prompt that is empty or leaves no
        room in the context, token ids the model has no embedding or logit for, more top logprobs than tokens."""
        vocab_size = self.model_config.vocab_size
        token_ids = [*prompt_token_ids, *(params.logit_bias or ())]
        if not 0 < len(prompt_token_ids) < self.max_model_len:
            raise ValueError(f"The engine cannot serve a prompt of {len(prompt_token_ids)} tokens "
                             f"(max_model_len={self.max_model_len}).")
        if not all(0 <= token_id < vocab_size for token_id in token_ids):
            raise ValueError(f"The request has token ids outside the vocabulary [0, {vocab_size}).")
        if max(params.logprobs or 0, params.prompt_logprobs or 0) > vocab_size:
            raise ValueError(f"The request asks for more top logprobs than the vocabulary has ({vocab_size}).")

    def _add_sequences(self, request: Request, max_tokens: int) -> None:
        params, prompt_token_ids = request.sampling_params, request.prompt_token_ids
        for index in range(params.n):
            child = child_sampling_params(params, index)
            seq = TokenSequence(request.request_id, index, prompt_token_ids, child, max_tokens,
                           prefill_leader=request.sequences[0] if index else None)
            seq.generator = make_generator(child.seed)
            if index == 0 and params.prompt_logprobs is not None:
                seq.prompt_logprobs = [None]
            if params.logprobs is not None:
                seq.logprobs = []
                seq.cumulative_logprob = 0.0
            self._completions[seq] = _CompletionState(
                IncrementalDetokenizer(self.tokenizer, prompt_token_ids, child.skip_special_tokens),
                StopChecker(child.stop, child.include_stop_str_in_output))
            request.sequences.append(seq)
            self.scheduler.add(seq)
            self.structured_output.add(seq)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its last delta (None if it is unknown or done)."""
        request = self._requests.get(request_id)
        if request is None:
            return None
        for seq in request.sequences:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
        return self._report(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def request_ids(self) -> list[str]:
        return list(self._requests)

    # ---- one step -----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one engine step; return the deltas of the requests it changed (streaming requests) or finished.

        An error caused by one request fails that request alone: a grammar that did not compile, or its output
        processing (``take_failures`` tells whom and why). An error of the model step itself cannot be pinned on a
        request and is raised: the engine ends.
        """
        for seq, exc in self.structured_output.poll():
            logger.error("compiling the structured-output grammar of request %s failed: %s", seq.request_id, exc)
            self._fail(seq.request_id, exc)
        sched_out = self.scheduler.schedule()
        if sched_out.is_empty:
            self.structured_output.wait_for_compiles(COMPILE_WAIT_SECONDS)
            return []
        # A failing model step is not one request's fault (the cache and the ranks may be half-written): it
        # propagates, and the engine ends (the server answers 503 and /health turns 503).
        result = self.runner.execute(sched_out.scheduled)
        self.scheduler.on_step_done(sched_out, result.num_accepted)
        self._observe_spec_decode(sched_out, result.num_accepted)
        touched: dict[str, Request] = {}
        for seq, chunk in result.prompt_logprobs:
            seq.prompt_logprobs.extend(lp.to_position_logprobs() for lp in chunk)
        for sampled in result.sampled:
            request_id = sampled.seq.request_id
            # Failed earlier in this loop, or stopped by an earlier token of this step (stop, max_tokens).
            if request_id not in self._requests or sampled.seq.is_finished:
                continue
            try:
                self._append_token(sampled)
            except Exception as exc:
                logger.exception("processing the output of request %s failed; aborting it", request_id)
                self._fail(request_id, exc)
                touched.pop(request_id, None)
                continue
            touched[request_id] = self._requests[request_id]
        for seq, drafts in result.drafts.items():
            if not seq.is_finished:
                seq.spec_token_ids = drafts
        return [out for request in touched.values() if (out := self._report(request)) is not None]

    def _observe_spec_decode(self, sched_out: SchedulerOutput, num_accepted: dict[TokenSequence, int]) -> None:
        if self.spec_decode_stats is None:
            return
        for item in sched_out.scheduled:
            if item.spec_token_ids:
                self.spec_decode_stats.observe(len(item.spec_token_ids), num_accepted.get(item.seq, 0))

    def take_failures(self) -> dict[str, Exception]:
        """Requests aborted because of an error since the last call, with the error."""
        failures, self._failures = self._failures, {}
        return failures

    def _fail(self, request_id: str, exc: Exception) -> None:
        self.abort_request(request_id)
        self._failures[request_id] = exc

    def _append_token(self, sampled: SampledToken) -> None:
        seq, token_id = sampled.seq, sampled.token_id
        params = seq.sampling_params
        seq.append_token(token_id)
        self._generation_tokens_total += 1
        if sampled.logprobs is not None and seq.logprobs is not None:
            seq.logprobs.append(sampled.logprobs.to_position_logprobs())
            seq.cumulative_logprob += sampled.logprobs.logprob
        finish_reason: str | None = None
        stop_reason: int | str | None = None
        if seq.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token_id == self.tokenizer.eos_token_id:
                finish_reason = "stop"
            elif token_id in params.stop_token_ids:
                finish_reason, stop_reason = "stop", token_id
        # As vLLM: the stop token itself is not part of the text unless include_stop_str_in_output.
        hide_token = finish_reason == "stop" and not params.include_stop_str_in_output
        if self.structured_output.accept(seq, token_id) and finish_reason is None:
            finish_reason = "stop"  # the grammar is complete: nothing but the end of the output may follow
        if finish_reason is None and (seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.max_model_len):
            finish_reason = "length"
        state = self._completions[seq]
        delta = "" if hide_token else state.detokenizer.step([token_id])
        if finish_reason is not None:
            delta += state.detokenizer.finish()
        check_stop_strings = seq.num_output_tokens > params.min_tokens  # as vLLM: none within min_tokens
        if delta and state.stop_checker.append(delta, check=check_stop_strings) is not None:
            finish_reason, stop_reason = "stop", state.stop_checker.stopped_by
        if finish_reason is not None:
            self.scheduler.finish(seq, finish_reason, stop_reason)
        state.new_text += state.stop_checker.stream_delta(finished=finish_reason is not None)

    def _report(self, request: Request) -> RequestOutput | None:
        """The request's delta since its previous report; a finished request is forgotten after this. A request
        that does not stream is reported once, when finished: its one delta is the whole answer."""
        finished = request.is_finished
        if not (finished or request.stream):
            return None
        # Every completion is in every report, finished siblings too (with nothing new): a streaming client sees
        # all n of them from the first output on.
        outputs = [self._completion_delta(seq) for seq in request.sequences]
        first = request.sequences[0]
        prompt_logprobs = None
        if first.prompt_logprobs is not None:
            prompt_logprobs = first.prompt_logprobs[request.num_prompt_logprobs_reported:]
            request.num_prompt_logprobs_reported = len(first.prompt_logprobs)
        out = RequestOutput(
            request_id=request.request_id,
            # The prompt goes out once, with the first report: later deltas do not resend it.
            prompt=None if request.reported else request.prompt,
            prompt_token_ids=[] if request.reported else request.prompt_token_ids,
            outputs=outputs,
            finished=finished,
            prompt_logprobs=prompt_logprobs,
            num_cached_tokens=request.num_cached_tokens,
        )
        request.reported = True
        if finished:
            del self._requests[request.request_id]
            for seq in request.sequences:
                del self._completions[seq]
                self.structured_output.remove(seq)
        return out

    def _completion_delta(self, seq: TokenSequence) -> CompletionOutput:
        """What ``seq`` gained since its previous report; moves its cursors past it."""
        state = self._completions[seq]
        token_ids = seq.token_ids[seq.num_prompt_tokens + state.num_tokens_reported:]
        state.num_tokens_reported += len(token_ids)
        logprobs = None
        if seq.logprobs is not None:
            logprobs = seq.logprobs[state.num_logprobs_reported:]
            state.num_logprobs_reported = len(seq.logprobs)
        text, state.new_text = state.new_text, ""
        return CompletionOutput(index=seq.index, text=text, token_ids=token_ids,
                                cumulative_logprob=seq.cumulative_logprob, logprobs=logprobs,
                                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason)

    # ---- introspection ------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop what the executor started (the model's worker processes, if any); the engine is unusable
        afterwards."""
        self._close_executor()

    def stats(self) -> EngineStats:
        blocks = self.block_manager
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            num_total_blocks=blocks.num_blocks,
            num_free_blocks=blocks.num_free_blocks,
            kv_cache_usage=blocks.usage,
            prefix_cache_queries=blocks.prefix_cache_queries,
            prefix_cache_hits=blocks.prefix_cache_hits,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_total=self._prompt_tokens_total,
            generation_tokens_total=self._generation_tokens_total,
            spec_decode=replace(self.spec_decode_stats, accepted_per_pos=list(self.spec_decode_stats.accepted_per_pos))
            if self.spec_decode_stats else None,
            weight_bytes=self.weight_bytes,
        )

    def reset_prefix_cache(self) -> bool:
        return self.block_manager.reset_prefix_cache()

