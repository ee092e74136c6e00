"""Every failure the HTTP server reports, in OpenAI's (and vLLM's) envelope:
``{"error": {"message", "type", "param", "code"}}`` with the right HTTP status.

Route code raises ``APIError`` (or the engine's ``InvalidRequestError``, a 400); ``install_error_handlers`` turns it,
FastAPI's validation errors (invalid JSON, a bad field) and Starlette's own errors (unknown route, wrong method) into
that envelope, so a client never sees a traceback or FastAPI's default 422 shape. vLLM converts request validation
errors to 400 as well.

Routes of another API (Anthropic's ``/v1/messages``) answer in that API's envelope: its module registers a renderer
for its path prefix (``register_error_shape``), and everything that answers an error - the handlers here, the
middlewares that refuse a request before any route runs - goes through ``error_response(path, error)``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dsv32.engine.validation import InvalidRequestError

logger = logging.getLogger(__name__)

# vLLM (>= 0.10.1) names the error type after the HTTP status, as the OpenAI SDK's exception classes do.
_ERROR_TYPES: dict[int, str] = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    501: "NotImplementedError",
    503: "ServiceUnavailableError",
}


def error_type_for(status_code: int) -> str:
    return _ERROR_TYPES.get(status_code, HTTPStatus(status_code).phrase.replace(" ", "") + "Error")


class APIError(Exception):
    """A request the server refuses or cannot finish; becomes one OpenAI-style JSON error."""

    def __init__(self, message: str, status_code: int = 400, param: str | None = None,
                 error_type: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.param = param
        self.error_type = error_type or error_type_for(status_code)

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param,
                          "code": self.status_code}}

    def to_response(self) -> JSONResponse:
        return JSONResponse(self.to_dict(), status_code=self.status_code)


# Path prefix -> the body of an error in that API's envelope (``register_error_shape``).
_ERROR_SHAPES: dict[str, Callable[[APIError], dict[str, Any]]] = {}


def register_error_shape(prefix: str, render: Callable[[APIError], dict[str, Any]]) -> None:
    """Errors of ``prefix`` and every path below it are rendered by ``render`` instead of OpenAI's envelope."""
    _ERROR_SHAPES[prefix.rstrip("/")] = render


def error_body(path: str, error: APIError) -> dict[str, Any]:
    """``error`` in the envelope of the API ``path`` belongs to."""
    for prefix, render in _ERROR_SHAPES.items():
        if path == prefix or path.startswith(prefix + "/"):
            return render(error)
    return error.to_dict()


def error_response(path: str, error: APIError) -> JSONResponse:
    return JSONResponse(error_body(path, error), status_code=error.status_code)


def model_not_found(model: str) -> APIError:
    return APIError(f"The model `{model}` does not exist.", 404, param="model")


def _describe_validation_error(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable sentence (and the offending field) out of pydantic's error list."""
    messages: list[str] = []
    first_param: str | None = None
    for err in exc.errors():
        loc = [str(part) for part in err.get("loc", ()) if part != "body"]
        field = ".".join(loc) or None
        if err.get("type") == "json_invalid":
            detail = err.get("ctx", {}).get("error") or err.get("msg", "could not parse")
            messages.append(f"Invalid JSON body: {detail}")
            continue
        if not loc and err.get("type") in ("model_attributes_type", "dict_type"):
            messages.append("The request body must be a JSON object (sent with Content-Type: application/json).")
            continue
        msg = str(err.get("msg", "invalid value"))
        # pydantic prefixes errors raised by our own validators; the prefix only adds noise for API users.
        msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
        messages.append(f"{field}: {msg}" if field else msg)
        if first_param is None:
            first_param = field
    return "; ".join(messages) or "Invalid request", first_param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(request.url.path, exc)

    @app.exception_handler(InvalidRequestError)
    async def _invalid_request(request: Request, exc: InvalidRequestError) -> JSONResponse:
        return error_response(request.url.path, APIError(str(exc), 400, param=exc.param))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation_error(exc)
        return error_response(request.url.path, APIError(message, 400, param=param))

    @app.exception_handler(json.JSONDecodeError)
    async def _json_error(request: Request, exc: json.JSONDecodeError) -> JSONResponse:
        return error_response(request.url.path, APIError(
            f"Invalid JSON body: {exc.msg} (line {exc.lineno} column {exc.colno})", 400))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        response = error_response(request.url.path, APIError(str(exc.detail), exc.status_code))
        for key, value in (exc.headers or {}).items():
            response.headers[key] = value
        return response



class InternalErrorMiddleware:
    """A bug met while serving one request becomes a 500 in the usual envelope, and the connection stays usable.
    (An ``exception_handler(Exception)`` would not do: Starlette sends its response and then re-raises, and the
    server resets the keep-alive connection.) An error after the response has started is logged; the response is
    cut short, which is all that can be done then."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._app(scope, receive, tracking_send)
        except Exception as exc:
            logger.exception("unhandled error while serving %s %s", scope["method"], scope["path"])
            if not started:
                response = error_response(scope["path"], APIError(f"Internal server error: {type(exc).__name__}",
                                                                   500))
                await response(scope, receive, send)
