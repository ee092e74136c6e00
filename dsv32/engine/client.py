"""``EngineClient``: the engine as the API server holds it (vLLM's ``EngineClient``), and ``QueueEngineClient``, the
request bookkeeping both of its implementations share.

The implementations differ only in where the ``EngineCoreLoop`` runs: ``AsyncLLM`` (``async_engine``) runs it in a
thread of this process; ``MPEngineClient`` (``process``) in an engine-core process of its own. Either way commands
go out through ``_send`` and each loop iteration's ``StepOutputs`` comes back through ``_on_step_outputs``, called
from a thread that is not the event loop's; outputs are handed to the event loop of the caller that asked for them,
one ``call_soon_threadsafe`` per loop per step. Outputs stay the engine's deltas all the way to the caller; a
caller that fell behind gets the deltas queued meanwhile merged into one. Torch-free: the API-server process imports
it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any, Protocol

from dsv32.config import EngineConfig, ModelConfig
from dsv32.engine.messages import AbortRequest, AddRequest, Command, StepOutputs, UtilityCall
from dsv32.engine.outputs import EngineStats, RequestOutput
from dsv32.engine.sampling_params import SamplingParams
from dsv32.engine.validation import InvalidRequestError, RequestValidator
from dsv32.tokenizer import Tokenizer

__all__ = ["EngineClient", "EngineDeadError", "EngineOverloadedError", "QueueEngineClient", "RequestFailedError"]


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full (``EngineConfig.max_waiting_requests``); the server answers 503."""


class RequestFailedError(RuntimeError):
    """The engine ended one request because of an error it met serving it (the engine itself goes on); the server
    answers 500 for it."""


class EngineDeadError(RuntimeError):
    """The engine was shut down, or its thread or process is gone, and takes no more requests; the server answers
    503."""


class EngineClient(Protocol):
    """What the server needs of an engine: submit a request and stream its outputs, abort, stats, shut down."""

    tokenizer: Tokenizer
    model_config: ModelConfig
    engine_config: EngineConfig
    max_model_len: int
    # The engine's limits, which callers check each request against before ``generate`` (the client does not).
    validator: RequestValidator

    @property
    def is_running(self) -> bool:
        """False once the engine is shut down or dead (``/health`` answers 503)."""
        ...

    def generate(self, prompt_token_ids: list[int], sampling_params: SamplingParams, request_id: str,
                 prompt: str | None = None, admitted: bool = False) -> AsyncIterator[RequestOutput]:
        """The request's outputs as deltas (``RequestOutput.add`` folds them into the whole answer): one after
        every step that produced tokens, or several merged into one for a caller that fell behind; the last one has
        ``finished`` True.

        The request was validated by the caller (``validator``); one the engine still cannot take fails alone.
        Raises ``InvalidRequestError`` for a request that can never be served, ``EngineOverloadedError`` when the
        waiting queue is full (unless ``admitted``: room was checked with ``admit`` for the group it belongs to),
        ``EngineDeadError`` when the engine is gone. Leaving the iteration early (or being cancelled) aborts the
        request.
        """
        ...

    def admit(self, num_seqs: int) -> None:
        """Check that ``num_seqs`` more sequences may wait now, as one unit (a batch of prompts):
        ``InvalidRequestError`` if they never can (more than the waiting limit), ``EngineOverloadedError`` if not
        now."""
        ...

    async def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks; its ``generate`` stream ends with finish_reason "abort"."""
        ...

    async def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix block (False while blocks are in use)."""
        ...

    def stats(self) -> EngineStats: ...

    async def shutdown(self) -> None:
        """Abort whatever is left and stop the engine."""
        ...


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]


class QueueEngineClient(ABC):
    """An ``EngineClient`` whose engine loop runs elsewhere: subclasses implement ``_send`` and ``shutdown`` and
    feed ``_on_step_outputs`` / ``_on_engine_dead`` from their receiving thread."""

    def __init__(self, tokenizer: Tokenizer, model_config: ModelConfig, engine_config: EngineConfig,
                 max_model_len: int, stats: EngineStats) -> None:
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.engine_config = engine_config
        self.max_model_len = max_model_len
        self.validator = RequestValidator.for_engine(engine_config, model_config, max_model_len)
        self._streams: dict[str, _Stream] = {}
        self._calls: dict[int, concurrent.futures.Future[Any]] = {}
        self._call_ids = itertools.count()
        self._lock = threading.Lock()  # guards everything above and below, shared with the receiving thread
        self._stats = stats
        self._num_pending_adds = 0  # sequences submitted that the engine has not taken yet
        self._dead: str | None = None  # why the engine is gone

    @abstractmethod
    def _send(self, command: Command) -> None:
        """Hand one command to the engine loop (never blocks the event loop)."""

    @abstractmethod
    async def shutdown(self) -> None: ...

    @property
    def is_running(self) -> bool:
        return self._dead is None

    @property
    def has_work_in_flight(self) -> bool:
        """Requests or calls the engine owes an answer."""
        with self._lock:
            return bool(self._streams or self._calls or self._num_pending_adds)

    # ---- requests -----------------------------------------------------------------------------------
    def admit(self, num_seqs: int) -> None:
        with self._lock:
            self._check_room(num_seqs)

    def _check_room(self, num_seqs: int) -> None:
        limit = self.engine_config.max_waiting_requests
        if num_seqs > limit:
            raise InvalidRequestError(f"The request needs {num_seqs} sequences (prompts x n), more than may ever wait "
                                      f"at once (max_waiting_requests={limit}): it can never be admitted; split it.")
        waiting = self._stats.num_waiting + self._num_pending_adds
        if waiting + num_seqs > limit:
            raise EngineOverloadedError(f"{waiting} sequences are waiting (max_waiting_requests={limit})")

    async def generate(self, prompt_token_ids: list[int], sampling_params: SamplingParams, request_id: str,
                       prompt: str | None = None, admitted: bool = False) -> AsyncIterator[RequestOutput]:
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:  # the receiving thread marks the engine dead under it: no stream is left unanswered
            self._check_alive()
            if request_id in self._streams:
                raise InvalidRequestError(f"Request id {request_id!r} is already running")
            if not admitted:
                self._check_room(sampling_params.n)
            self._streams[request_id] = stream
            self._num_pending_adds += sampling_params.n
        self._send(AddRequest(request_id, list(prompt_token_ids), sampling_params, prompt))
        finished = False
        try:
            while True:
                item = _merge_queued(await stream.queue.get(), stream.queue)
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
            if not finished and self.is_running:
                self._send(AbortRequest(request_id))

    async def abort(self, request_id: str) -> None:
        if self.is_running:
            self._send(AbortRequest(request_id))

    async def reset_prefix_cache(self) -> bool:
        return await self._call("reset_prefix_cache")

    def stats(self) -> EngineStats:
        with self._lock:
            return replace(self._stats, num_waiting=self._stats.num_waiting + self._num_pending_adds)

    async def _call(self, method: str) -> Any:
        result: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            self._check_alive()
            call_id = next(self._call_ids)
            self._calls[call_id] = result
        self._send(UtilityCall(call_id, method))
        return await asyncio.wrap_future(result)

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(self._dead)

    # ---- the receiving thread -----------------------------------------------------------------------
    def _on_step_outputs(self, step: StepOutputs) -> None:
        """Hand one loop iteration's outputs, failures and utility results to whoever waits for them."""
        deliveries: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput | BaseException]]] = {}
        with self._lock:
            self._stats = step.stats
            self._num_pending_adds = max(0, self._num_pending_adds - step.num_seqs_added)
            for out in step.outputs:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    continue
                deliveries.setdefault(stream.loop, []).append((stream, out))
            for failure in step.failures:
                stream = self._streams.get(failure.request_id)
                if stream is not None:
                    error = (InvalidRequestError(failure.message) if failure.invalid
                             else RequestFailedError(failure.message))
                    deliveries.setdefault(stream.loop, []).append((stream, error))
            calls = [(self._calls.pop(call_id), result) for call_id, result in step.utility_results
                     if call_id in self._calls]
        for call, result in calls:
            if isinstance(result, BaseException):
                call.set_exception(result)
            else:
                call.set_result(result)
        self._deliver(deliveries)

    def _on_engine_dead(self, reason: str) -> None:
        """The engine is gone: every open stream and pending call ends with ``EngineDeadError(reason)``."""
        deliveries: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput | BaseException]]] = {}
        with self._lock:
            if self._dead is not None:  # already failed, for the first reason
                return
            self._dead = reason
            for stream in self._streams.values():
                deliveries.setdefault(stream.loop, []).append((stream, EngineDeadError(reason)))
            calls, self._calls = list(self._calls.values()), {}
        for call in calls:
            call.set_exception(EngineDeadError(reason))
        self._deliver(deliveries)

    @staticmethod
    def _deliver(deliveries: dict[asyncio.AbstractEventLoop,
                                  list[tuple[_Stream, RequestOutput | BaseException]]]) -> None:
        for loop, items in deliveries.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop is closed: nobody is listening any more
                pass


def _merge_queued(item: RequestOutput | BaseException,
                  queue: asyncio.Queue[RequestOutput | BaseException]) -> RequestOutput | BaseException:
    """``item`` with every delta queued behind it folded in, so a consumer that fell behind catches up in one go
    without losing any. An error queued behind them ends the request and is what the consumer gets (as before the
    outputs were deltas, when the newest item replaced the others)."""
    while not isinstance(item, BaseException) and not item.finished and not queue.empty():
        later = queue.get_nowait()
        if isinstance(later, BaseException):
            return later
        item.add(later)
    return item


def _put_all(items: list[tuple[_Stream, RequestOutput | BaseException]]) -> None:
    for stream, item in items:
        stream.queue.put_nowait(item)
