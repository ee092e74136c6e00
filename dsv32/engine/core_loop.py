"""``EngineCoreLoop``: the busy loop around one ``EngineCore``, wherever it runs (a thread of the server process, or
the engine-core process). Commands come in through a queue; each iteration applies every command that arrived, runs
one step if anything is unfinished, and emits one ``StepOutputs`` with all that changed. Idle, it sleeps on the
queue. It is the only code that touches the core. One bad request never ends it: an error attributable to a request
(refused or failed when added, a grammar that did not compile, its output processing) is reported as that request's
``Failure`` and the loop goes on. An error of the step itself is not attributable and ends the loop (raised to its
owner, which takes the engine-death path).
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from typing import Any

from dsv32.engine.core import EngineCore
from dsv32.engine.messages import AbortRequest, AddRequest, Command, Failure, Shutdown, StepOutputs, UtilityCall
from dsv32.engine.outputs import RequestOutput, SpecDecodeStats
from dsv32.engine.structured_output import GrammarCompileError

logger = logging.getLogger(__name__)

# How often the loop logs vLLM's throughput / cache line while busy.
STATS_LOG_INTERVAL_S = 10.0

# The EngineCore methods a client may call between steps.
UTILITY_METHODS = frozenset({"reset_prefix_cache"})


class EngineCoreLoop:
    def __init__(self, core: EngineCore, commands: queue.SimpleQueue[Command],
                 emit: Callable[[StepOutputs], None]) -> None:
        self._core = core
        self._commands = commands
        self._emit = emit
        self._last_log = (time.monotonic(), 0, 0)  # time, prompt tokens total, generation tokens total
        self._last_spec_decode = SpecDecodeStats()

    def run(self) -> None:
        """Serve commands until ``Shutdown`` (then abort what is left, report it, and return)."""
        core = self._core
        while True:
            # Idle: sleep until a command arrives. Busy: take whatever arrived and go on stepping.
            commands = [] if core.has_unfinished_requests() else [self._commands.get()]
            while True:
                try:
                    commands.append(self._commands.get_nowait())
                except queue.Empty:
                    break
            report = StepOutputs(outputs=[], stats=self._core.stats())
            outputs: list[RequestOutput] = []
            stopping = False
            for command in commands:
                if isinstance(command, Shutdown):
                    stopping = True
                else:
                    self._apply(command, outputs, report)
            if stopping:
                outputs += [out for rid in core.request_ids() if (out := core.abort_request(rid)) is not None]
            stepped = not stopping and core.has_unfinished_requests()
            if stepped:
                outputs += core.step()
                report.failures += [Failure(rid, str(exc), invalid=True) if isinstance(exc, GrammarCompileError)
                                    else Failure(rid, f"The engine failed on request {rid}: {exc}")
                                    for rid, exc in core.take_failures().items()]
                self._maybe_log_stats()
            # Every step is reported, even one that only prefilled: the client's watchdog reads it as progress.
            if commands or stepped:
                report.outputs = outputs
                report.stats = core.stats()
                self._emit(report)
            if stopping:
                return

    def _apply(self, command: Command, outputs: list[RequestOutput], report: StepOutputs) -> None:
        core = self._core
        if isinstance(command, AddRequest):
            report.num_seqs_added += command.params.n
            try:
                core.add_request(command.request_id, command.prompt_token_ids, command.params, prompt=command.prompt,
                                 stream=True)
            except ValueError as exc:
                report.failures.append(Failure(command.request_id, str(exc), invalid=True))
            except Exception as exc:  # a bug this request ran into: it fails alone, the engine goes on
                logger.exception("adding request %s failed", command.request_id)
                report.failures.append(Failure(command.request_id, f"The engine could not add the request: "
                                                                    f"{type(exc).__name__}: {exc}"))
        elif isinstance(command, AbortRequest):
            out = core.abort_request(command.request_id)
            if out is not None:
                outputs.append(out)
        elif isinstance(command, UtilityCall):
            result: Any
            if command.method not in UTILITY_METHODS:
                result = ValueError(f"unknown engine method {command.method!r}")
            else:
                try:
                    result = getattr(core, command.method)()
                except Exception as exc:
                    result = exc
            report.utility_results.append((command.call_id, result))

    def _maybe_log_stats(self) -> None:
        now = time.monotonic()
        then, prompt_then, gen_then = self._last_log
        if now - then < STATS_LOG_INTERVAL_S:
            return
        s = self._core.stats()
        elapsed = now - then
        hit_rate = s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0
        logger.info("Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, Running: %d "
                    "reqs, Waiting: %d reqs, KV cache usage: %.1f%%, Prefix cache hit rate: %.1f%%",
                    (s.prompt_tokens_total - prompt_then) / elapsed, (s.generation_tokens_total - gen_then) / elapsed,
                    s.num_running, s.num_waiting, 100 * s.kv_cache_usage, 100 * hit_rate)
        self._last_log = (now, s.prompt_tokens_total, s.generation_tokens_total)
        if s.spec_decode is not None:
            interval = s.spec_decode.since(self._last_spec_decode)
            if interval.num_drafts:
                logger.info("%s", interval.log_line(elapsed))
            self._last_spec_decode = s.spec_decode
