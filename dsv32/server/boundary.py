"""The request boundary: every request body is read, size-limited, parsed and checked here once, before any route
sees it, so nothing a client sends can drive the server past the interpreter's limits or reach the engine unchecked.

``RequestBoundaryMiddleware`` (plain ASGI, so a client disconnect still reaches the streaming handlers) for each
request with a body:
- refuses a body over ``max_request_bytes`` with 413 (from ``Content-Length`` at once, or while reading), and one
  that does not arrive within ``body_timeout_s`` with 408 (slow-loris clients hold no handler);
- parses a JSON body (``Content-Type: application/json``) and refuses, with a 400 naming the field: nesting deeper
  than ``max_json_depth`` (the C JSON parser and every later walk over the value recurse, so depth is bounded
  before anything else), ``NaN`` / ``Infinity`` and numbers that overflow a double (JSON has no non-finite numbers;
  Python's parser accepts them), integers outside int64, and strings holding a lone UTF-16 surrogate (``"\\ud800"``:
  valid JSON escape syntax, but no Unicode text; it cannot be tokenized, logged or encoded back).
The checked body is then handed to the app unchanged. The same limits hold for JSON carried inside strings
(``JSON_TEXT_FIELDS``: tool-call arguments, ``guided_json`` text, structural tags), which the server parses later.

The walk over the parsed value is iterative: a body can make it long (bounded by the size limit) but never deep.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Iterator
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dsv32.server.errors import APIError, error_response
from dsv32.server.settings import RequestLimits

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class InvalidJSONValue(ValueError):
    """A JSON value the server refuses; ``param`` is the dotted path of the offending field."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


class MalformedJSON(InvalidJSONValue):
    """Text that is not JSON at all."""


class _NonFinite(float):
    """``NaN`` / ``Infinity`` or a number that overflows a double, as parsed; refused by the walk, which knows its
    field."""

    text: str

    def __new__(cls, text: str) -> _NonFinite:
        number = super().__new__(cls, float(text))
        number.text = text
        return number


def _parse_float(text: str) -> float:
    value = float(text)
    return value if math.isfinite(value) else _NonFinite(text)


def parse_json(text: str | bytes, max_depth: int, where: str | None = None) -> Any:
    """``text`` parsed and checked (see the module docstring); ``InvalidJSONValue`` says what is wrong and where."""
    prefix = f"{where}: " if where else ""
    try:
        value = json.loads(text, parse_constant=_NonFinite, parse_float=_parse_float)
    except RecursionError:
        raise InvalidJSONValue(f"{prefix}JSON is nested more than {max_depth} levels deep.", where) from None
    except UnicodeDecodeError as exc:
        raise InvalidJSONValue(f"{prefix}the body is not UTF-8: {exc.reason} at byte {exc.start}.", where) from None
    except ValueError as exc:  # json.JSONDecodeError, and integers longer than Python converts (4300 digits)
        raise MalformedJSON(f"{prefix}Invalid JSON body: {exc}" if where is None else f"{prefix}invalid JSON: {exc}",
                            where) from None
    check_json_value(value, max_depth, where)
    return value


# String fields that carry JSON the server parses later: tool-call arguments, schemas and structural tags given
# as text. Their JSON is held to the same limits as the body's.
JSON_TEXT_FIELDS = frozenset({"arguments", "guided_json", "json_schema", "json", "schema", "structural_tag"})


def _check_json_text(text: str, max_depth: int, where: str) -> None:
    """Refuse JSON inside a string field if it breaks the limits (its depth counts on from the field's own, so
    JSON in strings in JSON cannot recurse without bound); text that is not JSON at all is left for the field's
    own check."""
    if not text.lstrip().startswith(("{", "[")):
        return
    try:
        parse_json(text, max_depth, where)
    except MalformedJSON:
        pass


def _path(parts: tuple[str | int, ...]) -> str | None:
    """The dotted path of a field; a key that is not valid text (a lone surrogate) is shown escaped."""
    return ".".join(str(part).encode("utf-8", "backslashreplace").decode() for part in parts) or None


def _walk(value: Any) -> Iterator[tuple[Any, tuple[str | int, ...], int]]:
    """Every value inside ``value`` (keys included, as strings), with its path and depth, without recursion."""
    stack: list[tuple[Any, tuple[str | int, ...], int]] = [(value, (), 0)]
    while stack:
        item, path, depth = stack.pop()
        yield item, path, depth
        if isinstance(item, dict):
            for key, child in item.items():
                yield key, (*path, key), depth + 1
                stack.append((child, (*path, key), depth + 1))
        elif isinstance(item, list):
            stack.extend((child, (*path, index), depth + 1) for index, child in enumerate(item))


# Fields whose value becomes a grammar (a tool's parameters constrain forced tool calls): the grammar compiler's
# time grows faster than linearly with a schema's size (xgrammar here: 1,000 properties 0.2 s, 4,000 2 s), so each
# is limited to this many JSON values (keys included). JSON text inside a string field counts for that field.
SCHEMA_FIELDS = frozenset({"response_format", "structured_outputs", "guided_json", "json_schema", "tools"})
MAX_SCHEMA_NODES = 8192


def _schema_root(path: tuple[str | int, ...]) -> tuple[str | int, ...] | None:
    """The schema-bearing field ``path`` lies in (each tool on its own), or None."""
    if not path or path[0] not in SCHEMA_FIELDS:
        return None
    return path[:2] if path[0] == "tools" else path[:1]


def check_json_value(value: Any, max_depth: int, where: str | None = None) -> None:
    """Depth, schema sizes, lone surrogates and int64 range over a parsed JSON value (``InvalidJSONValue`` naming
    the field)."""
    base = (where,) if where else ()
    # JSON text inside a string (``where``) counts for the schema field the string lies in, if any.
    inner_root = base if where and where.split(".", 1)[0] in SCHEMA_FIELDS else None
    schema_nodes: dict[tuple[str | int, ...], int] = {}
    for item, path, depth in _walk(value):
        root = inner_root if base else _schema_root(path)
        if root is not None:
            schema_nodes[root] = count = schema_nodes.get(root, 0) + 1
            if count > MAX_SCHEMA_NODES:
                field = _path(root)
                raise InvalidJSONValue(f"{field}: the schema has more than {MAX_SCHEMA_NODES} JSON values; the "
                                       "grammar it would compile to is too large.", field)
        if depth > max_depth:
            field = _path(base or path[:1]) or "body"
            raise InvalidJSONValue(f"{field}: JSON is nested more than {max_depth} levels deep (the server's "
                                   "--max-json-depth).", field)
        if isinstance(item, str):
            if path and path[-1] in JSON_TEXT_FIELDS and isinstance(path[-1], str):
                _check_json_text(item, max_depth - depth, _path((*base, *path)) or "body")
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError as exc:
                    field = _path((*base, *path)) or "body"
                    raise InvalidJSONValue(
                        f"{field}: the text holds a lone UTF-16 surrogate ({item[exc.start]!r} at character "
                        f"{exc.start}), which is not Unicode text; send valid UTF-8 (surrogate pairs are fine).",
                        field) from None
        elif isinstance(item, _NonFinite):
            field = _path((*base, *path))
            raise InvalidJSONValue(f"{field}: {item.text[:40]} is not a finite number (JSON numbers must be finite "
                                   "doubles).", field)
        elif isinstance(item, int) and not isinstance(item, bool) and not _INT64_MIN <= item <= _INT64_MAX:
            field = _path((*base, *path))
            raise InvalidJSONValue(f"{field}: the integer is outside the 64-bit range.", field)


class RequestBoundaryMiddleware:
    """Reads and checks every request body before the app runs (see the module docstring)."""

    def __init__(self, app: ASGIApp, limits: RequestLimits) -> None:
        self._app = app
        self._limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self._app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            body = await self._read_body(headers, receive)
            if body and "json" in headers.get("content-type", ""):
                parse_json(body, self._limits.max_json_depth)
        except APIError as exc:
            await error_response(scope["path"], exc)(scope, receive, send)
            return
        except InvalidJSONValue as exc:
            await error_response(scope["path"], APIError(str(exc), 400, param=exc.param))(scope, receive, send)
            return
        await self._app(scope, _replay(body, receive), send)

    async def _read_body(self, headers: Headers, receive: Receive) -> bytes:
        limit = self._limits.max_request_bytes
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        chunks: list[bytes] = []
        size = 0
        deadline = time.monotonic() + self._limits.body_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise APIError(f"The request body did not arrive within {self._limits.body_timeout_s:.0f} s.",
                               408) from None
            if message["type"] == "http.disconnect":
                raise APIError("The client disconnected before sending its whole body.", 400)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _too_large(limit: int) -> APIError:
    return APIError(f"The request body is larger than {limit} bytes (the server's --max-request-bytes).", 413)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives the app the body already read, then whatever the client sends next (its
    disconnect, which the streaming handlers watch for)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
