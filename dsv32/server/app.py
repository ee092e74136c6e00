"""The FastAPI application: every HTTP route of the OpenAI-compatible server, API-key auth, and the engine's
lifetime (shut down, aborting what is left, when the app stops).

``GET /`` is the built-in chat page (``dsv32/server/static``: plain HTML/CSS/JS, nothing fetched from elsewhere).
Routes (vLLM's shapes): ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models`` (and
``/v1/models/{model}``), ``POST /tokenize`` and ``/detokenize`` (also under ``/v1``), ``GET /tokenizer_info``,
``GET /health``, ``GET /version``, ``GET /metrics``. For load balancers (vllm-router, sglang-router):
``GET /get_load``, ``/get_model_info``, ``/get_server_info``, ``POST /flush_cache`` (``dsv32.server.worker_info``).
Anthropic's ``POST /v1/messages`` and ``/v1/messages/count_tokens`` are ``dsv32.server.anthropic``'s router; OpenAI's
Responses API (``/v1/responses``) is ``dsv32.server.responses``'s, Ollama's native API (``/api/...``)
``dsv32.server.ollama``'s.
"""

from __future__ import annotations

import hmac
import importlib.metadata
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from dsv32.engine.client import EngineClient
from dsv32.server import anthropic, ollama, responses
from dsv32.server.boundary import RequestBoundaryMiddleware
from dsv32.server.chat import create_chat_completion, render_tokenize_prompt
from dsv32.server.completions import create_completion
from dsv32.server.errors import APIError, InternalErrorMiddleware, error_response, install_error_handlers
from dsv32.server.metrics import CONTENT_TYPE, ErrorCountingMiddleware, ServerMetrics
from dsv32.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from dsv32.server.settings import ServerConfig
from dsv32.server.state import ServerState
from dsv32.server.worker_info import load, model_info, server_info

try:
    VERSION = importlib.metadata.version("dsv32")
except importlib.metadata.PackageNotFoundError:  # running from a source tree that was never installed
    VERSION = "0.0.0+source"

# The chat page's files, shipped as package data.
STATIC_DIR = Path(__file__).parent / "static"


def build_app(engine: EngineClient, config: ServerConfig) -> FastAPI:
    """The app serving ``engine`` (already started). The engine is shut down with the app."""
    metrics = ServerMetrics(config.model_name, engine.stats, devices=engine.engine_config.world_size)
    state = ServerState(engine=engine, config=config, metrics=metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await engine.shutdown()

    app = FastAPI(title="dsv32", version=VERSION, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = state
    install_error_handlers(app)
    # Outermost last: the key is checked before a body is read, bodies are checked before any route runs.
    app.add_middleware(InternalErrorMiddleware)
    app.add_middleware(RequestBoundaryMiddleware, limits=config.limits)
    if config.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key)
    app.add_middleware(ErrorCountingMiddleware, metrics=metrics)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/health", response_class=Response, responses={200: {"description": "The engine is running (no body)"},
                                                             503: {"description": "The engine is gone (no body)"}})
    async def health() -> Response:
        return Response(status_code=200 if engine.is_running else 503)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": VERSION}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/get_load")
    async def get_load() -> dict[str, int]:
        return load(state)

    @app.get("/get_model_info")
    @app.get("/model_info")
    async def get_model_info() -> dict[str, Any]:
        return model_info(state)

    @app.get("/get_server_info")
    @app.get("/server_info")
    async def get_server_info() -> dict[str, Any]:
        return server_info(state, VERSION)

    @app.post("/flush_cache", response_class=PlainTextResponse,
              responses={400: {"description": "Requests are running", "content": {"text/plain": {}}}})
    async def flush_cache() -> Response:
        # SGLang answers 400 while requests hold cached blocks; so do we (the routers only look at the status).
        if await engine.reset_prefix_cache():
            return PlainTextResponse("Cache flushed.", status_code=200)
        return PlainTextResponse("Cache not flushed: requests are running.", status_code=400)

    def model_card(name: str) -> ModelCard:
        return ModelCard(id=name, root=config.model_path, max_model_len=state.max_model_len)

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        cards = [model_card(name) for name in config.served_model_names]
        return JSONResponse(ModelList(data=cards).model_dump(mode="json"))

    @app.get("/v1/models/{model:path}")
    async def retrieve_model(model: str) -> JSONResponse:
        state.check_model(model)
        return JSONResponse(model_card(model).model_dump(mode="json"))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, raw_request: Request) -> Response:
        return await create_chat_completion(state, request, raw_request)

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, raw_request: Request) -> Response:
        return await create_completion(state, request, raw_request)

    app.include_router(anthropic.router)
    app.state.responses = responses.ResponseStore(config.max_stored_responses)
    app.include_router(responses.router)
    app.include_router(ollama.router)

    @app.post("/tokenize")
    @app.post("/v1/tokenize")
    async def tokenize(request: TokenizeRequest) -> dict[str, Any]:
        state.check_model(request.model)
        if request.messages is not None:
            size = sum(len(message.text() or "") for message in request.messages)
            token_ids = await state.offload(size, lambda: state.tokenizer.encode(render_tokenize_prompt(request)))
        else:
            token_ids = await state.offload(len(request.prompt or ""), state.tokenizer.encode, request.prompt or "",
                                            request.add_special_tokens)
        body: dict[str, Any] = {"count": len(token_ids), "max_model_len": state.max_model_len, "tokens": token_ids}
        if request.return_token_strs:
            body["token_strs"] = state.tokenizer.convert_ids_to_tokens(token_ids)
        return body

    @app.post("/detokenize")
    @app.post("/v1/detokenize")
    async def detokenize(request: DetokenizeRequest) -> dict[str, str]:
        state.check_model(request.model)
        state.validator.check_token_ids(request.tokens, "tokens")
        return {"prompt": state.tokenizer.decode(request.tokens, skip_special_tokens=False)}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        tokenizer = state.tokenizer
        return {
            "tokenizer_class": "DeepSeekV32Tokenizer",
            "bos_token": tokenizer.bos_token,
            "eos_token": tokenizer.eos_token,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token": None,
            "vocab_size": tokenizer.vocab_size,
            "model_max_length": state.max_model_len,
            # V3.2 has no Jinja template: prompts are rendered by DeepSeek's Python encoding (dsv32.encoding).
            "chat_template": None,
            "add_bos_token": True,
        }

    return app


# Routes outside /v1 that change the server's state, and so need the key too.
PROTECTED_ROUTES = frozenset({"/flush_cache"})


class APIKeyMiddleware:
    """With an API key, every ``/v1`` route (vLLM protects exactly these), every Ollama ``/api`` route (they generate
    too) and every route that changes the server's state (``PROTECTED_ROUTES``) needs ``Authorization: Bearer <key>``
    (the scheme is case-insensitive, RFC 7235) or ``x-api-key: <key>`` (Anthropic's header, which its SDK sends).
    The rest (the chat page, health, version, metrics, the routers' load and info routes, ``/tokenize``,
    ``/detokenize``, ``/tokenizer_info``, ``/openapi.json``) stays open, as in vLLM. Plain ASGI rather than
    ``@app.middleware``: that wrapper buffers the request channel, which would hide a client disconnect from the
    streaming handlers."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self._app = app
        self._expected = api_key.encode()

    def _authorized(self, scope: Scope) -> bool:
        headers = Headers(scope=scope)
        scheme, _, credentials = headers.get("authorization", "").strip().partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), self._expected):
            return True
        return hmac.compare_digest(headers.get("x-api-key", "").strip().encode(), self._expected)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and scope["method"] != "OPTIONS"
                and (scope["path"].startswith(("/v1", "/api/")) or scope["path"] in PROTECTED_ROUTES)
                and not self._authorized(scope)):
            response = error_response(scope["path"], APIError(
                "Unauthorized: a valid 'Authorization: Bearer <api key>' or 'x-api-key' header is required.", 401))
            await response(scope, receive, send)
            return
        await self._app(scope, receive, send)
