"""Server-sent events framing for streamed responses: ``data: <json>\\n\\n`` per chunk, ``data: [DONE]\\n\\n`` last.

An error after the stream has started cannot change the HTTP status any more, so it is sent as one
``data: {"error": {...}}`` event followed by ``[DONE]``, as vLLM does. Another API's stream (Anthropic's named
events, no ``[DONE]``) passes its own ``error_event`` and ``done``; ``on_error`` is told each such error's status (the
metrics count it: the response's own status was 200).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from dsv32.server.errors import APIError

logger = logging.getLogger(__name__)

SSE_DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(payload: BaseModel | dict[str, Any]) -> str:
    if isinstance(payload, BaseModel):
        body = payload.model_dump_json()
    else:
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {body}\n\n"


def named_sse_event(payload: dict[str, Any]) -> str:
    """One SSE event named after its payload's ``type`` (Anthropic's and OpenAI Responses' framing: their SDKs read
    the event name)."""
    return f"event: {payload['type']}\ndata: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _openai_error_event(error: APIError) -> str:
    return sse_event(error.to_dict())


async def _framed(events: AsyncGenerator[str, None], error_event: Callable[[APIError], str] = _openai_error_event,
                  done: str | None = SSE_DONE, on_error: Callable[[int], None] | None = None) -> AsyncIterator[str]:
    # aclosing: when the client goes away this generator is closed, and `events` must run its cleanup (aborting the
    # engine request) right then, not whenever the garbage collector finalizes it.
    async with contextlib.aclosing(events):
        error: APIError | None = None
        try:
            async for event in events:
                yield event
        except APIError as exc:
            error = exc
        except Exception as exc:
            logger.exception("error while streaming a response")
            error = APIError(f"Internal server error: {type(exc).__name__}", 500)
        if error is not None:
            if on_error is not None:
                on_error(error.status_code)
            yield error_event(error)
        if done is not None:
            yield done


def sse_response(events: AsyncGenerator[str, None], headers: dict[str, str] | None = None, *,
                 error_event: Callable[[APIError], str] = _openai_error_event, done: str | None = SSE_DONE,
                 on_error: Callable[[int], None] | None = None,
                 media_type: str = "text/event-stream") -> StreamingResponse:
    """A ``text/event-stream`` response of ``events`` (already framed by ``sse_event``), ended by ``done``; an error
    raised by ``events`` is sent as ``error_event(error)`` before it. Another framing (Ollama's NDJSON lines) passes
    its ``media_type``."""
    return StreamingResponse(_framed(events, error_event, done, on_error), media_type=media_type,
                             headers={**SSE_HEADERS, **(headers or {})})
