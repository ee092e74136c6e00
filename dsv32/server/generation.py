"""One engine request as the HTTP layer drives it: start it, turn engine refusals into HTTP errors, abort it when
the client goes away or the handler is cancelled, and feed the per-request metrics.

Requests arrive validated (``dsv32.server.sampling``). ``EngineRequest.start()`` waits for the engine's first output
before any HTTP status is sent, so what only the engine can refuse (a structured-output grammar that does not
compile: 400) or a full waiting queue (503) is a proper error response even for ``stream=true`` (SGLang's
"kick-start"). Everything after that is read from ``outputs()``: the engine's deltas, which a handler that needs the
whole answer folds together with ``RequestOutput.add``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.requests import Request

from dsv32.engine.client import EngineDeadError, EngineOverloadedError, RequestFailedError
from dsv32.engine.outputs import RequestOutput
from dsv32.engine.sampling_params import SamplingParams
from dsv32.engine.validation import InvalidRequestError
from dsv32.server.errors import APIError
from dsv32.server.metrics import RequestMetrics
from dsv32.server.state import ServerState

logger = logging.getLogger(__name__)

def engine_unavailable(exc: EngineDeadError) -> APIError:
    return APIError(f"The engine is not running: {exc}", 503)


# Abort tasks that must outlive a cancelled handler; referenced here so they are not garbage-collected mid-run.
_background: set[asyncio.Future[None]] = set()


class EngineRequest:
    """Drives ``engine.generate`` for one prompt on behalf of one HTTP request."""

    def __init__(self, state: ServerState, request_id: str, prompt_token_ids: list[int],
                 sampling_params: SamplingParams, raw_request: Request | None, prompt: str | None = None,
                 admitted: bool = False) -> None:
        """``admitted``: room was checked for this request's group (``admit_all``)."""
        self._state = state
        self._engine = state.engine
        self._metrics = state.metrics
        self.request_id = request_id
        self._prompt_token_ids = prompt_token_ids
        self._params = sampling_params
        self._raw_request = raw_request
        self._prompt = prompt
        self._admitted = admitted
        self._stream: AsyncIterator[RequestOutput] | None = None
        self._first: RequestOutput | None = None
        self._finished = False
        self._watcher: asyncio.Task[None] | None = None
        self._timing: RequestMetrics | None = None
        self._generated = 0  # tokens generated so far over all n completions

    async def start(self) -> RequestOutput:
        """Submit the request and wait for its first output; raises ``APIError`` (400/503) if the engine refuses."""
        self._timing = self._metrics.track(self._params.n, self._params.max_tokens or 0)
        self._state.active_requests.add(self)
        self._stream = aiter(self._engine.generate(self._prompt_token_ids, self._params, self.request_id,
                                                   prompt=self._prompt, admitted=self._admitted))
        if self._raw_request is not None:
            self._watcher = asyncio.create_task(self._watch_disconnect(), name=f"watch-{self.request_id}")
        try:
            self._first = await anext(self._stream)
        except EngineOverloadedError as exc:
            await self._reject("overloaded")
            raise APIError(f"The server is overloaded: {exc}. Retry later.", 503) from None
        except EngineDeadError as exc:
            await self._reject("engine_dead")
            raise engine_unavailable(exc) from None
        except ValueError as exc:
            await self._reject("invalid")
            raise APIError(str(exc), 400, param=getattr(exc, "param", None) or self._param_of(exc)) from None
        except RequestFailedError as exc:
            await self.close()
            raise APIError(str(exc), 500) from None
        except StopAsyncIteration:
            await self.close()
            raise APIError("The engine ended the request without output.", 500) from None
        except BaseException:
            await self.close()
            raise
        self._observe(self._first)
        return self._first

    @property
    def num_prompt_tokens(self) -> int:
        return len(self._prompt_token_ids)

    async def final_output(self) -> RequestOutput:
        """The whole answer: every output folded into the first."""
        final: RequestOutput | None = None
        async with contextlib.aclosing(self.outputs()) as outputs:
            async for out in outputs:
                if final is None:
                    final = out
                else:
                    final.add(out)
        assert final is not None
        return final

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """The first output (again) and every later one, until the engine marks the request finished: deltas."""
        assert self._stream is not None and self._first is not None, "start() first"
        try:
            yield self._first
            if self._first.finished:
                return
            async for out in self._stream:
                self._observe(out)
                yield out
                if out.finished:
                    return
        except EngineDeadError as exc:
            raise engine_unavailable(exc) from None
        except RequestFailedError as exc:
            raise APIError(str(exc), 500) from None
        except InvalidRequestError as exc:  # refused after it started (a grammar that did not compile)
            raise APIError(str(exc), 400, param=exc.param or self._param_of(exc)) from None
        finally:
            await self.close()

    def _param_of(self, exc: Exception) -> str | None:
        """The request field an engine refusal is about, when the engine could not say: a structured-output spec
        the grammar compiler refused came from the field the server built it from."""
        constraint = self._params.structured_outputs
        return constraint.source if constraint is not None and "structured outputs" in str(exc) else None

    async def _reject(self, reason: str) -> None:
        """The engine refused the request: nothing to abort, and it does not count as a finished request."""
        self._finished = True
        self._metrics.count_rejected(reason)
        await self.close()

    def _observe(self, out: RequestOutput) -> None:
        assert self._timing is not None
        self._generated += sum(len(c.token_ids) for c in out.outputs)
        self._timing.on_tokens(self._generated)
        if out.finished and not self._finished:
            reason = "abort" if any(c.finish_reason == "abort" for c in out.outputs) else (
                out.outputs[0].finish_reason or "stop")
            self._finish(reason)

    def _finish(self, reason: str) -> None:
        self._finished = True
        if self._timing is not None:
            self._timing.on_finish(reason, len(self._prompt_token_ids), self._generated)

    async def _watch_disconnect(self) -> None:
        """Waits for the client to hang up, then aborts the engine request so its KV blocks are freed now."""
        assert self._raw_request is not None
        while True:
            message = await self._raw_request.receive()
            if message["type"] == "http.disconnect":
                break
        logger.info("client of request %s disconnected; aborting it", self.request_id)
        await self.abort()

    async def abort(self) -> None:
        """Ask the engine to stop this request; its output stream then ends with finish_reason "abort"."""
        if not self._finished:
            await self._engine.abort(self.request_id)

    async def close(self) -> None:
        """Stop watching the client and abort the engine request unless it already finished. The abort runs in its
        own task: this is often called while the handler is being cancelled (client gone, server shutting down),
        and the blocks must be freed even then."""
        self._state.active_requests.discard(self)
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
        stream, self._stream = self._stream, None
        aborting = asyncio.ensure_future(self._abort_and_close(stream))
        _background.add(aborting)
        aborting.add_done_callback(_background.discard)
        await asyncio.shield(aborting)

    async def _abort_and_close(self, stream: AsyncIterator[RequestOutput] | None) -> None:
        try:
            await self.abort()
        finally:
            # Closed before the engine's final output was read (client gone, shutdown): count it as aborted.
            if not self._finished:
                self._finish("abort")
            if stream is not None and hasattr(stream, "aclose"):
                await stream.aclose()


async def merge_outputs(requests: list[EngineRequest]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave the outputs of several started requests as they arrive, tagged with each one's position."""
    if len(requests) == 1:
        try:
            async for out in requests[0].outputs():
                yield 0, out
        finally:
            await requests[0].close()
        return
    queue: asyncio.Queue[tuple[int, RequestOutput] | tuple[int, BaseException] | None] = asyncio.Queue()

    async def pump(position: int, request: EngineRequest) -> None:
        try:
            async for out in request.outputs():
                await queue.put((position, out))
        except Exception as exc:  # handed to the consumer, which re-raises it
            await queue.put((position, exc))
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
                continue
            position, payload = item
            if isinstance(payload, BaseException):
                raise payload
            yield position, payload
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for request in requests:
            await request.close()


def admit_all(state: ServerState, num_seqs: int) -> None:
    """Room for a batch of requests, checked once for all of them (``EngineClient.admit``) as an HTTP error."""
    try:
        state.engine.admit(num_seqs)
    except EngineOverloadedError as exc:
        state.metrics.count_rejected("overloaded")
        raise APIError(f"The server is overloaded: {exc}. Retry later.", 503) from None


async def start_all(requests: list[EngineRequest]) -> list[RequestOutput]:
    """Start every request; if one is refused, abort the ones already started and re-raise its error."""
    results = await asyncio.gather(*(r.start() for r in requests), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            for request in requests:
                await request.close()
            raise result
    return results  # type: ignore[return-value]
