"""``AsyncLLM``: the engine as the server drives it. Add a request, get an async stream of outputs; abort; stats.

The ``EngineCore`` runs in one background thread, the only thread that touches it. The asyncio side talks to it
through a command queue (add, abort, shutdown), and the thread hands each output back to the event loop of the
caller that asked for it (``call_soon_threadsafe``). The model runs outside the event loop, so the server stays
responsive while a step computes; the thread also never dies on one bad request: errors end that request's stream.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from dsv32.config import EngineConfig, ModelConfig
from dsv32.engine.core import EngineCore, EngineStats
from dsv32.engine.outputs import RequestOutput
from dsv32.engine.sampling_params import SamplingParams
from dsv32.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

__all__ = ["AsyncLLM", "EngineDeadError", "EngineOverloadedError", "EngineStats"]

# How often the engine thread logs vLLM's throughput / cache line while busy.
STATS_LOG_INTERVAL_S = 10.0


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full (``EngineConfig.max_waiting_requests``); the server answers 503."""


class EngineDeadError(RuntimeError):
    """The engine was shut down (or its thread is gone) and takes no more requests."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Call:
    """Run a function on the engine thread between two steps (e.g. reset the prefix cache)."""

    fn: Any
    result: Future


_SHUTDOWN = object()


def _leave_a_core_to_the_event_loop() -> None:
    """On CPU the model's OpenMP team and the server's event loop (HTTP, SSE, detokenizing) share the cores. A team
    that loses one of its cores to the event loop stalls at every barrier, so unless ``OMP_NUM_THREADS`` says
    otherwise the model gets all cores but one (measured on 2 cores, tiny model: 1 thread gives 31 ms TPOT at
    concurrency 1 and 130 output tok/s at 8, against 37 ms and 110 tok/s with 2)."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores - 1)
    torch.set_num_threads(threads)
    logger.info("CPU serving: %d model thread(s), one core left to the event loop", threads)


class AsyncLLM:
    """Continuous batching behind an asyncio interface (Contract B)."""

    def __init__(self, core: EngineCore) -> None:
        self._core = core
        self.tokenizer: Tokenizer = core.tokenizer
        self.model_config: ModelConfig = core.model_config
        self.engine_config: EngineConfig = core.engine_config
        self.max_model_len: int = core.max_model_len
        self._commands: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()  # guards _streams and _num_pending_adds
        self._num_pending_adds = 0
        self._dead = False
        self._last_log = (time.monotonic(), 0, 0)  # time, prompt tokens total, generation tokens total
        self._thread = threading.Thread(target=self._engine_loop, name="dsv32-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_config(cls, engine_config: EngineConfig) -> AsyncLLM:
        """Load the model and tokenizer, size the KV cache, and start the engine thread."""
        core = EngineCore(engine_config)
        if core.device.type == "cpu":
            _leave_a_core_to_the_event_loop()
        return cls(core)

    # ---- requests -----------------------------------------------------------------------------------
    async def generate(self, prompt_token_ids: list[int], sampling_params: SamplingParams, request_id: str,
                       prompt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs after every step that produced tokens; the last one has ``finished`` True.

        Raises ``ValueError`` for a request that can never be served, ``EngineOverloadedError`` when the waiting
        queue is full. Leaving the iteration early (or being cancelled) aborts the request.
        """
        if self._dead:
            raise EngineDeadError("The engine has been shut down.")
        self._core.validate(prompt_token_ids, sampling_params)  # reads only configuration: safe off-thread
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"Request id {request_id!r} is already running")
            waiting = self._core.scheduler.num_waiting + self._num_pending_adds
            if waiting >= self.engine_config.max_waiting_requests:
                raise EngineOverloadedError(f"{waiting} requests are waiting (max_waiting_requests="
                                            f"{self.engine_config.max_waiting_requests})")
            self._streams[request_id] = stream
            self._num_pending_adds += sampling_params.n
        self._commands.put(_Add(request_id, list(prompt_token_ids), sampling_params, prompt))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                # Outputs are cumulative: a consumer that fell behind only needs the newest one.
                while not isinstance(item, BaseException) and not item.finished and not stream.queue.empty():
                    item = stream.queue.get_nowait()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished and not self._dead:
                self._commands.put(_Abort(request_id))

    async def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks; its ``generate`` stream ends with finish_reason "abort"."""
        if not self._dead:
            self._commands.put(_Abort(request_id))

    async def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix block (False while blocks are in use)."""
        return await self._call(self._core.reset_prefix_cache)

    def stats(self) -> EngineStats:
        stats = self._core.stats()
        stats.num_waiting += self._num_pending_adds
        return stats

    async def shutdown(self) -> None:
        """Abort whatever is left and stop the engine thread."""
        if not self._dead:
            self._commands.put(_SHUTDOWN)
        await asyncio.to_thread(self._thread.join)

    async def _call(self, fn: Any) -> Any:
        if self._dead:
            raise EngineDeadError("The engine has been shut down.")
        result: Future = Future()
        self._commands.put(_Call(fn, result))
        return await asyncio.wrap_future(result)

    # ---- the engine thread --------------------------------------------------------------------------
    def _engine_loop(self) -> None:
        try:
            while True:
                idle = not self._core.has_unfinished_requests()
                # Idle: sleep until a command arrives. Busy: take whatever arrived and go on stepping.
                commands = [self._commands.get()] if idle else []
                while True:
                    try:
                        commands.append(self._commands.get_nowait())
                    except queue.Empty:
                        break
                for command in commands:
                    if command is _SHUTDOWN:
                        self._abort_all()
                        return
                    self._apply(command)
                if self._core.has_unfinished_requests():
                    self._step()
        except BaseException:
            logger.exception("the engine thread crashed")
            self._abort_all()
            raise
        finally:
            self._dead = True
            self._fail_all_streams(EngineDeadError("The engine has been shut down."))

    def _apply(self, command: Any) -> None:
        if isinstance(command, _Add):
            with self._lock:
                self._num_pending_adds -= command.params.n
                if command.request_id not in self._streams:  # its consumer already left
                    return
            try:
                self._core.add_request(command.request_id, command.prompt_token_ids, command.params,
                                       prompt=command.prompt, stream=True)
            except Exception as exc:
                self._deliver(command.request_id, exc)
        elif isinstance(command, _Abort):
            out = self._core.abort_request(command.request_id)
            if out is not None:
                self._deliver(command.request_id, out)
        elif isinstance(command, _Call):
            try:
                command.result.set_result(command.fn())
            except Exception as exc:
                command.result.set_exception(exc)

    def _step(self) -> None:
        for out in self._core.step():
            self._deliver(out.request_id, out)
        for request_id, exc in self._core.take_failures().items():
            self._deliver(request_id, RuntimeError(f"The engine failed on request {request_id}: {exc}"))
        self._maybe_log_stats()

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is None:
            return
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        except RuntimeError:  # that event loop is closed: nobody is listening any more
            pass

    def _abort_all(self) -> None:
        for request_id in list(self._core.request_ids()):
            out = self._core.abort_request(request_id)
            if out is not None:
                self._deliver(request_id, out)

    def _fail_all_streams(self, exc: BaseException) -> None:
        with self._lock:
            request_ids = list(self._streams)
        for request_id in request_ids:
            self._deliver(request_id, exc)

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
