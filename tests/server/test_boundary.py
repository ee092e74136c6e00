"""The request boundary (dsv32.server.boundary) in one process: body size and arrival time, JSON depth, schema size,
non-finite and out-of-range numbers, lone surrogates - each a 4xx in the OpenAI envelope naming the field, answered
before any route runs - and the API key's case-insensitive scheme and protected routes."""

from __future__ import annotations

import json
import time

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from dsv32.server.app import APIKeyMiddleware
from dsv32.server.boundary import (
    MAX_SCHEMA_NODES,
    InvalidJSONValue,
    RequestBoundaryMiddleware,
    check_json_value,
    parse_json,
)
from dsv32.server.errors import InternalErrorMiddleware, install_error_handlers
from dsv32.server.settings import RequestLimits

JSON = {"content-type": "application/json"}


SMALL = RequestLimits(max_request_bytes=4096, max_json_depth=16)
ROOMY = RequestLimits(max_request_bytes=4 * 1024 * 1024, max_json_depth=16)


def make_client(limits: RequestLimits = SMALL, api_key: str | None = None) -> tuple[TestClient, list[object]]:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(InternalErrorMiddleware)
    app.add_middleware(RequestBoundaryMiddleware, limits=limits)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    seen: list[object] = []

    @app.post("/v1/echo")
    async def echo(request: Request) -> dict[str, object]:
        body = await request.json()
        seen.append(body)
        return {"ok": True}

    @app.post("/flush_cache")
    async def flush() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/health")
    async def health() -> dict[str, bool]:
        return {"ok": True}

    return TestClient(app), seen


def nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    return error


def test_a_valid_body_reaches_the_route_unchanged() -> None:
    client, seen = make_client()
    body = {"messages": [{"content": "h\u00e9llo \U0001f600"}], "n": 2**63 - 1, "x": 1.5e300}
    assert client.post("/v1/echo", content=json.dumps(body), headers=JSON).status_code == 200
    assert seen == [body]


@pytest.mark.parametrize("depth", [17, 1000, 100_000])
def test_deep_json_is_a_fast_400_naming_the_field(depth: int) -> None:
    client, seen = make_client(ROOMY)
    started = time.perf_counter()
    error = error_of(client.post("/v1/echo", content=f'{{"response_format": {nested(depth)}}}', headers=JSON), 400)
    assert time.perf_counter() - started < 1.0
    assert "nested more than" in error["message"] and not seen


def test_json_inside_string_fields_counts_toward_the_depth() -> None:
    client, seen = make_client()
    arguments = nested(12)
    body = {"messages": [{"tool_calls": [{"function": {"name": "f", "arguments": arguments}}]}]}
    error = error_of(client.post("/v1/echo", content=json.dumps(body), headers=JSON), 400)
    assert error["param"] == "messages.0.tool_calls.0.function.arguments" and not seen
    # Text that is not JSON is left to the route.
    body["messages"][0]["tool_calls"][0]["function"]["arguments"] = "{not json"
    assert client.post("/v1/echo", content=json.dumps(body), headers=JSON).status_code == 200


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999", "-1e400"])
def test_non_finite_numbers_are_refused(literal: str) -> None:
    client, seen = make_client()
    error = error_of(client.post("/v1/echo", content=f'{{"temperature": {literal}}}', headers=JSON), 400)
    assert "finite" in error["message"] and not seen


def test_integers_outside_int64_are_refused_with_their_field() -> None:
    client, _ = make_client(ROOMY)
    error = error_of(client.post("/v1/echo", content='{"max_tokens": 9223372036854775808}', headers=JSON), 400)
    assert error["param"] == "max_tokens"
    error = error_of(client.post("/v1/echo", content='{"n": 1' + "0" * 5000 + "}", headers=JSON), 400)
    assert "Invalid JSON body" in error["message"]


@pytest.mark.parametrize("where,body", [
    ("messages.0.content", '{"messages": [{"content": "ok \\ud800"}]}'),
    ("model", '{"model": "\\udfff"}'),
    ("stop.1", '{"stop": ["a", "\\ud800x"]}'),
    ("logit_bias.\\udc00", '{"logit_bias": {"\\udc00": 1}}'),
])
def test_lone_surrogates_are_refused_naming_the_field(where: str, body: str) -> None:
    client, seen = make_client()
    error = error_of(client.post("/v1/echo", content=body, headers=JSON), 400)
    assert "surrogate" in error["message"] and not seen
    assert where.split(".")[0] == error["param"].split(".")[0]


def test_surrogate_pairs_are_text() -> None:
    client, seen = make_client()
    assert client.post("/v1/echo", content='{"content": "\\ud83d\\ude00"}', headers=JSON).status_code == 200
    assert seen == [{"content": "\U0001f600"}]


def test_oversized_bodies_are_a_413_before_or_while_reading() -> None:
    client, seen = make_client()
    error = error_of(client.post("/v1/echo", content=b'{"a": "' + b"x" * 5000 + b'"}', headers=JSON), 413)
    assert "--max-request-bytes" in error["message"]
    # A Content-Length beyond the limit is refused from the header alone.
    response = client.post("/v1/echo", content=b"{}", headers={**JSON, "content-length": str(10**12)})
    assert response.status_code == 413 and not seen


def test_schemas_are_limited_in_size() -> None:
    schema = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(MAX_SCHEMA_NODES // 4)}}
    with pytest.raises(InvalidJSONValue, match="more than"):
        check_json_value({"tools": [{"function": {"parameters": schema}}]}, 64)
    # Tool-call arguments are data, not a schema: no size limit beyond the body's.
    check_json_value({"messages": [{"tool_calls": [{"function": {"arguments": json.dumps(schema)}}]}]}, 64)
    with pytest.raises(InvalidJSONValue) as raised:
        check_json_value({"guided_json": json.dumps(schema)}, 64)
    assert raised.value.param == "guided_json"


def test_parse_json_never_recurses_past_the_interpreter() -> None:
    for text in ("[" * 200_000, '{"a":' * 50_000):
        with pytest.raises(InvalidJSONValue):
            parse_json(text, 64)


def test_a_500_keeps_the_envelope_and_the_connection() -> None:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(InternalErrorMiddleware)

    @app.get("/crash")
    async def crash() -> None:
        raise KeyError("internal detail")

    with TestClient(app) as client:  # raise_server_exceptions: the error must not escape the app
        error = error_of(client.get("/crash"), 500)
        assert "internal detail" not in error["message"]


def test_api_key_scheme_is_case_insensitive_and_state_changing_routes_need_it() -> None:
    client, _ = make_client(api_key="s3cret")
    for scheme in ("Bearer", "bearer", "BEARER"):
        assert client.post("/v1/echo", json={}, headers={"Authorization": f"{scheme} s3cret"}).status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                    {"Authorization": "Basic s3cret"}):
        assert client.post("/v1/echo", json={}, headers=headers).status_code == 401
        assert client.post("/flush_cache", headers=headers).status_code == 401
    assert client.post("/flush_cache", headers={"Authorization": "bearer s3cret"}).status_code == 200
    assert client.get("/health").status_code == 200
