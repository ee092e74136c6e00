"""The OpenAI error envelope for every kind of failure, and SSE framing (including errors after the stream began)."""

from __future__ import annotations

import asyncio
import json

from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel

from dsv32.engine.validation import InvalidRequestError
from dsv32.server.errors import APIError, InternalErrorMiddleware, install_error_handlers
from dsv32.server.sse import SSE_DONE, _framed, sse_event


class Body(BaseModel):
    n: int


def make_client() -> TestClient:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(InternalErrorMiddleware)

    @app.post("/echo")
    async def echo(body: Body) -> dict[str, int]:
        return {"n": body.n}

    @app.get("/refuse")
    async def refuse() -> None:
        raise APIError("full", 503)

    @app.get("/invalid")
    async def invalid() -> None:
        raise InvalidRequestError("n=9 is larger than max_num_seqs=8", param="n")

    @app.get("/crash")
    async def crash() -> None:
        raise RuntimeError("secret internals")

    # raise_server_exceptions stays on: a 500 must be answered without the exception escaping the app (which is
    # what makes uvicorn reset the connection).
    return TestClient(app)


def assert_envelope(response, status: int, error_type: str) -> dict:
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and error["type"] == error_type
    return error


def test_invalid_json_is_a_400_not_fastapis_422() -> None:
    response = make_client().post("/echo", content=b"{not json", headers={"content-type": "application/json"})
    error = assert_envelope(response, 400, "BadRequestError")
    assert "Invalid JSON" in error["message"]


def test_body_that_is_not_a_json_object_is_explained() -> None:
    for response in (make_client().post("/echo", json=[1, 2]), make_client().post("/echo", content=b"n=1")):
        error = assert_envelope(response, 400, "BadRequestError")
        assert "must be a JSON object" in error["message"]


def test_invalid_field_names_the_field() -> None:
    error = assert_envelope(make_client().post("/echo", json={"n": "many"}), 400, "BadRequestError")
    assert error["param"] == "n" and error["message"].startswith("n: ")


def test_api_error_keeps_its_status() -> None:
    error = assert_envelope(make_client().get("/refuse"), 503, "ServiceUnavailableError")
    assert error["message"] == "full"


def test_engine_validation_errors_are_400_naming_the_field() -> None:
    error = assert_envelope(make_client().get("/invalid"), 400, "BadRequestError")
    assert error["param"] == "n" and error["message"] == "n=9 is larger than max_num_seqs=8"


def test_unknown_route_and_method_use_the_envelope() -> None:
    assert_envelope(make_client().get("/nowhere"), 404, "NotFoundError")
    assert_envelope(make_client().get("/echo"), 405, "MethodNotAllowedError")


def test_unexpected_exception_is_a_500_without_internals() -> None:
    error = assert_envelope(make_client().get("/crash"), 500, "InternalServerError")
    assert "secret internals" not in error["message"]


def collect(events) -> list[str]:
    async def run() -> list[str]:
        return [event async for event in _framed(events)]

    return asyncio.run(run())


def test_sse_frames_chunks_and_ends_with_done() -> None:
    async def events():
        yield sse_event({"a": "é"})
        yield sse_event(Body(n=2))

    assert collect(events()) == ['data: {"a":"é"}\n\n', 'data: {"n":2}\n\n', SSE_DONE]


def test_error_after_stream_start_becomes_an_error_event_then_done() -> None:
    async def events():
        yield sse_event({"a": 1})
        raise APIError("engine hiccup", 500)

    frames = collect(events())
    assert frames[0] == 'data: {"a":1}\n\n' and frames[-1] == SSE_DONE
    payload = json.loads(frames[1].removeprefix("data: "))
    assert payload["error"]["message"] == "engine hiccup" and payload["error"]["code"] == 500


def test_unexpected_error_mid_stream_hides_internals() -> None:
    async def events():
        raise KeyError("internal detail")
        yield ""  # pragma: no cover - makes this an async generator

    frames = collect(events())
    assert "internal detail" not in frames[0] and '"code":500' in frames[0] and frames[1] == SSE_DONE
