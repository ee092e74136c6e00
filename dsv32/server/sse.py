"""Server-sent events framing for streamed responses: ``data: <json>\\n\\n`` per chunk, ``data: [DONE]\\n\\n`` last.

An error after the stream has started cannot change the HTTP status any more, so it is sent as one
``data: {"error": {...}}`` event followed by ``[DONE]``, as vLLM does.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
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


async def _framed(events: AsyncGenerator[str, None]) -> AsyncIterator[str]:
    # aclosing: when the client goes away this generator is closed, and `events` must run its cleanup (aborting the
    # engine request) right then, not whenever the garbage collector finalizes it.
    async with contextlib.aclosing(events):
        try:
            async for event in events:
                yield event
        except APIError as exc:
            yield sse_event(exc.to_dict())
        except Exception as exc:
            logger.exception("error while streaming a response")
            yield sse_event(APIError(f"Internal server error: {type(exc).__name__}", 500).to_dict())
        yield SSE_DONE


def sse_response(events: AsyncGenerator[str, None], headers: dict[str, str] | None = None) -> StreamingResponse:
    """A ``text/event-stream`` response of ``events`` (already framed by ``sse_event``), ended by ``[DONE]``."""
    return StreamingResponse(_framed(events), media_type="text/event-stream",
                             headers={**SSE_HEADERS, **(headers or {})})
