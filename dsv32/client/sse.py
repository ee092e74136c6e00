"""Reading an OpenAI-compatible server's answers as a client: the JSON payloads of a Server-Sent Events stream (up
to ``data: [DONE]``) and the message of an error body. Shared by ``dsv32 chat`` and ``dsv32 bench serve``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Any

_DONE = "[DONE]"


def _data(line: str) -> str | None:
    """The data of one ``data:`` line, None for any other line (blank separators, comments, ``event:``)."""
    return line[len("data:"):].strip() if line.startswith("data:") else None


def payloads(lines: Iterable[str]) -> Iterator[Any]:
    """Each event's JSON payload, until ``[DONE]`` or the end of the stream (``ValueError`` for one that is not
    JSON). An error payload (``{"error": ...}``) is yielded like any other: what to do with it is the caller's."""
    for line in lines:
        data = _data(line)
        if data == _DONE:
            return
        if data is not None:
            yield json.loads(data)


async def apayloads(lines: AsyncIterable[str]) -> AsyncIterator[Any]:
    """``payloads`` of an asynchronous stream of lines."""
    async for line in lines:
        data = _data(line)
        if data == _DONE:
            return
        if data is not None:
            yield json.loads(data)


def error_message(payload: Any) -> str:
    """The message of an OpenAI-style error body, whichever of the nested / flat forms the server used."""
    if isinstance(payload, dict):
        error = payload.get("error", payload)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
    return json.dumps(payload)[:500]


def response_error(status_code: int, body: bytes) -> str:
    """What an HTTP error response says: ``HTTP <status>: <its error message>`` (the start of the body when it is not
    JSON)."""
    try:
        message = error_message(json.loads(body))
    except ValueError:
        message = body.decode(errors="replace")[:500]
    return f"HTTP {status_code}: {message}"
