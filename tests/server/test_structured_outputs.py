"""Structured outputs through the HTTP API, on the real engine (a one-layer tiny model with random weights, served
in-process): response_format, vLLM's structured_outputs / guided_* fields, grammar-constrained tool calls streamed
and not, thinking mode, and the 400s for bad specs. A random model writes valid output only because of the grammar.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import jsonschema
import pytest
from fastapi.testclient import TestClient

from dsv32.config import EngineConfig, tiny_config
from dsv32.engine.async_engine import AsyncLLM
from dsv32.engine.core import EngineCore
from dsv32.server.app import build_app
from dsv32.server.settings import ServerConfig

USER = [{"role": "user", "content": "Answer."}]
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 5}, "age": {
    "type": "integer", "minimum": 0, "maximum": 99}, "likes": {"type": "array", "items": {"enum": ["tea", "rain"]},
                                                                "maxItems": 2}}, "required": ["name", "age"]}
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {
    "type": "integer", "minimum": 1, "maximum": 7}}, "required": ["city", "days"]}
TIME = {"type": "object", "properties": {"utc": {"type": "boolean"}}, "required": ["utc"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    config = EngineConfig(dtype="float32", device="cpu", max_model_len=2048, max_num_seqs=8,
                          max_num_batched_tokens=2048)
    core = EngineCore(config, tiny_config().with_overrides(num_hidden_layers=1))
    with TestClient(build_app(AsyncLLM(core), ServerConfig(served_model_names=("tiny",)))) as test_client:
        yield test_client


def chat(client: TestClient, **body) -> dict:
    response = client.post("/v1/chat/completions", json={"messages": USER, "seed": 1, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_response_format_json_schema(client: TestClient) -> None:
    body = chat(client, n=3, max_tokens=64, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    finished = [c for c in body["choices"] if c["finish_reason"] == "stop"]
    assert finished, "a bounded schema should complete within 64 tokens"
    for choice in finished:
        jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)


def test_structured_outputs_and_guided_fields(client: TestClient) -> None:
    regex = r"[A-Z][a-z]{2}-\d{3}"
    body = chat(client, max_tokens=16, structured_outputs={"regex": regex})
    assert re.fullmatch(regex, body["choices"][0]["message"]["content"])
    body = chat(client, max_tokens=16, guided_choice=["sunny", "rainy"])
    assert body["choices"][0]["message"]["content"] in ("sunny", "rainy")
    body = chat(client, max_tokens=32, structured_outputs={"json": {"type": "array", "items": {"type": "boolean"},
                                                                     "minItems": 1, "maxItems": 2}})
    value = json.loads(body["choices"][0]["message"]["content"])
    assert isinstance(value, list) and 1 <= len(value) <= 2
    response = client.post("/v1/completions", json={"prompt": "Pick:", "max_tokens": 16, "seed": 2,
                                                    "guided_regex": "(yes|no)!"})
    assert response.status_code == 200 and response.json()["choices"][0]["text"] in ("yes!", "no!")
    # SGLang's spellings.
    body = chat(client, max_tokens=16, ebnf='root ::= "a" | "bc"')
    assert body["choices"][0]["message"]["content"] in ("a", "bc")
    response = client.post("/v1/completions", json={"prompt": "Pick:", "max_tokens": 16, "seed": 2,
                                                    "json_schema": '{"enum": [1, 2]}'})
    assert response.status_code == 200 and response.json()["choices"][0]["text"] in ("1", "2")


def _check_calls(tool_calls: list[dict]) -> None:
    assert tool_calls
    for call in tool_calls:
        name = call["function"]["name"]
        assert name in SCHEMAS and call["id"].startswith("call_")
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[name])


def test_required_tool_choice_gives_valid_calls(client: TestClient) -> None:
    body = chat(client, n=2, max_tokens=400, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    for choice in body["choices"]:
        assert choice["finish_reason"] == "tool_calls", choice
        assert choice["message"]["content"] is None
        _check_calls(choice["message"]["tool_calls"])
        assert len(choice["message"]["tool_calls"]) == 1  # parallel_tool_calls=false


def test_named_tool_choice_streamed(client: TestClient) -> None:
    response = client.post("/v1/chat/completions", json={
        "messages": USER, "seed": 3, "max_tokens": 400, "tools": TOOLS, "stream": True,
        "tool_choice": {"type": "function", "function": {"name": "get_time"}}})
    assert response.status_code == 200
    chunks = [json.loads(line.removeprefix("data: ")) for line in response.text.split("\n")
              if line.startswith("data: {")]
    calls: dict[int, dict] = {}
    finish = None
    for chunk in chunks:
        choice = chunk["choices"][0]
        finish = choice["finish_reason"] or finish
        assert not choice["delta"].get("content")
        for delta in choice["delta"].get("tool_calls") or []:
            call = calls.setdefault(delta["index"], {"id": delta.get("id"), "function": {"name": None,
                                                                                          "arguments": ""}})
            call["function"]["name"] = delta["function"].get("name") or call["function"]["name"]
            call["function"]["arguments"] += delta["function"].get("arguments") or ""
    assert finish == "tool_calls"
    _check_calls(list(calls.values()))
    assert {call["function"]["name"] for call in calls.values()} == {"get_time"}


def test_thinking_stays_free_and_is_returned(client: TestClient) -> None:
    """In thinking mode the grammar starts after </think>; a bias makes the random model close its thinking."""
    think_end = client.post("/tokenize", json={"prompt": "</think>"}).json()["tokens"][-1]
    body = chat(client, n=4, max_tokens=80, logit_bias={str(think_end): 12}, chat_template_kwargs={"thinking": True},
                response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
    assert any(choice["message"].get("reasoning_content") for choice in body["choices"])
    for choice in body["choices"]:
        if choice["finish_reason"] == "stop":
            jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)


@pytest.mark.parametrize(("fields", "needle"), [
    ({"structured_outputs": {"regex": "a(b"}}, "parenthesis"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "uniqueItems": True}}}}, "uniqueItems"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer",
                                                                                      "minimum": 5,
                                                                                      "maximum": 1}}}}, "minimum"),
    ({"guided_json": "{oops"}, "not valid JSON"),
    ({"structured_outputs": {"grammar": "root ::= nothing"}}, "nothing"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "exactly one"),
    ({"structured_outputs": {"pattern": "a"}}, "unknown keys"),
    ({"guided_choice": []}, "non-empty"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "Only one kind"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "Only one kind"),
])
def test_bad_specs_are_400(client: TestClient, fields: dict, needle: str) -> None:
    response = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 4, **fields})
    assert response.status_code == 400, response.text
    assert needle in response.json()["error"]["message"]
