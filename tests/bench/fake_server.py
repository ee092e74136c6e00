"""A small OpenAI-compatible server for tests: streams SSE chunks on /v1/completions and /v1/chat/completions.

It stands in for `dsv32 serve` (or vLLM) so the benchmark and the eval run end to end without a model: the answer
is `answer(prompt)` split into word chunks, or `max_tokens` copies of " tok" for benchmark loads; a non-streamed chat
request may instead get the whole message `reply(body)` (content, reasoning_content, tool_calls) for the evals; every
`fail_every`-th request fails, alternately with HTTP 500 and with an error event in the middle of the stream.
`running_server(config)` serves it on 127.0.0.1 on a free port in a background thread and yields the base URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

MODEL = "fake-model"


@dataclass
class FakeServerConfig:
    """How the fake server answers; `requests` collects every request body it received, in arrival order."""

    answer: Callable[[str], str] | None = None
    # The assistant message's fields (content, reasoning_content, tool_calls) for a non-streamed chat request body.
    reply: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    usage: bool = True
    first_token_delay_s: float = 0.0
    token_delay_s: float = 0.0
    fail_every: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    # Prometheus text served on /metrics, called per scrape (None: no /metrics, as a server without metrics).
    metrics: Callable[[], str] | None = None


def _prompt_text(body: dict[str, Any]) -> str:
    if "prompt" in body:
        return str(body["prompt"])
    parts = []
    for message in body.get("messages", []):
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content)
        parts.append(f"{message['role']}: {content}")
    return "\n".join(parts)


def _pieces(config: FakeServerConfig, body: dict[str, Any]) -> list[str]:
    """The output as one string per token: word pieces of the answer (cut at stop strings), or " tok" repeats."""
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 16
    if config.answer is None:
        return [" tok"] * max_tokens
    text = config.answer(_prompt_text(body))
    for stop in body.get("stop") or []:
        text = text.split(stop)[0]
    return re.findall(r"\s*\S+", text)[:max_tokens]


def _choice(piece: str, chat: bool, finish_reason: str | None) -> dict[str, Any]:
    if chat:
        delta = {"content": piece} if piece else {}
        return {"index": 0, "delta": delta, "finish_reason": finish_reason}
    return {"index": 0, "text": piece, "finish_reason": finish_reason}


def make_app(config: FakeServerConfig) -> FastAPI:
    app = FastAPI()
    counter = itertools.count(1)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": MODEL, "object": "model", "root": MODEL}]}

    async def generate(request: Request, chat: bool) -> Any:
        body = await request.json()
        config.requests.append(body)
        number = next(counter)
        failing = config.fail_every and number % config.fail_every == 0
        if failing and (number // config.fail_every) % 2 == 1:
            return JSONResponse({"error": {"message": "injected failure", "code": 500}}, status_code=500)
        if chat and config.reply is not None and not body.get("stream"):
            message = {"role": "assistant", **config.reply(body)}
            completion_tokens = len(str(message.get("content") or "").split())
            return {"object": "chat.completion", "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 7, "completion_tokens": completion_tokens,
                              "total_tokens": 7 + completion_tokens}}
        pieces = _pieces(config, body)
        usage = {"prompt_tokens": 7, "completion_tokens": len(pieces), "total_tokens": 7 + len(pieces)}
        if not body.get("stream"):
            text = "".join(pieces)
            choice = {"index": 0, "finish_reason": "stop"}
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            return {"object": "chat.completion" if chat else "text_completion", "choices": [choice], "usage": usage}

        async def events() -> Any:
            await asyncio.sleep(config.first_token_delay_s)
            if chat:
                yield _sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            for i, piece in enumerate(pieces):
                if i:
                    await asyncio.sleep(config.token_delay_s)
                if failing and i == len(pieces) // 2:
                    yield _sse({"error": {"message": "injected stream failure", "code": 500}})
                    yield "data: [DONE]\n\n"
                    return
                # Like vLLM, the last token's chunk carries the finish reason.
                finish_reason = "length" if i == len(pieces) - 1 else None
                yield _sse({"choices": [_choice(piece, chat, finish_reason)]})
            if not pieces:
                yield _sse({"choices": [_choice("", chat, "stop")]})
            if config.usage and (body.get("stream_options") or {}).get("include_usage"):
                yield _sse({"choices": [], "usage": usage})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/metrics")
    async def metrics() -> Any:
        if config.metrics is None:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        return PlainTextResponse(config.metrics())

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await generate(request, chat=True)

    return app


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(config: FakeServerConfig) -> Iterator[str]:
    """Serve the fake app in a thread for the duration of the block; yields `http://127.0.0.1:PORT`."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(make_app(config), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("fake server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
