"""Ollama's native API of a real `dsv32 serve` (tiny model, random weights), driven with the official `ollama` Python
client: chat and streamed chat, thinking, a tool round trip in the history, a JSON-schema ``format``, generate
(plain and streamed), list / show / ps / version, and errors (``ollama.ResponseError`` with Ollama's status and
message).

The model's text is noise: tests pin shapes, counts and reasons. The JSON answer is valid because its grammar makes
it so. The random model never writes a tool call, so calls coming back are test_ollama.py's (scripted engine).
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import ollama
import pytest

from tests.server.conftest import API_KEY, ServerProcess

pytestmark = pytest.mark.e2e

MODEL = "dsv32-tiny"
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
# A seeded sampler: the same tokens every run, and (over a 128k vocabulary) no end of sequence within a few tokens.
SHORT = {"num_predict": 5, "seed": 1}


@pytest.fixture(scope="module")
def server(server_factory) -> ServerProcess:
    return server_factory("tiny", "--api-key", API_KEY, "--served-model-name", MODEL)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> ollama.Client:
    return ollama.Client(host=server.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)


def prompt_tokens(server: ServerProcess, messages: list[dict], **chat: object) -> int:
    return httpx.post(f"{server.base_url}/tokenize", json={"messages": messages, **chat}).json()["count"]


def test_chat(client: ollama.Client, server: ServerProcess) -> None:
    answer = client.chat(model=MODEL, messages=USER, options=SHORT, keep_alive="5m")
    assert answer.model == MODEL and answer.done and answer.done_reason == "length"
    assert answer.message.role == "assistant" and answer.message.content and answer.message.thinking is None
    assert answer.eval_count == 5 and answer.prompt_eval_count == prompt_tokens(server, USER)
    assert answer.total_duration >= answer.prompt_eval_duration + answer.eval_duration > 0
    # The same request again: the prefix cache holds the prompt's full blocks, which are not evaluated again.
    again = client.chat(model=f"{MODEL}:latest", messages=USER, options=SHORT)
    assert again.message.content == answer.message.content and again.prompt_eval_count <= answer.prompt_eval_count


def test_streamed_chat(client: ollama.Client) -> None:
    chunks = list(client.chat(model=MODEL, messages=USER, options=SHORT, stream=True))
    assert [chunk.done for chunk in chunks] == [False] * (len(chunks) - 1) + [True]
    last = chunks[-1]
    assert last.done_reason == "length" and last.eval_count == 5 and last.message.content == ""
    streamed = "".join(chunk.message.content for chunk in chunks)
    assert streamed == client.chat(model=MODEL, messages=USER, options=SHORT).message.content


def test_think(client: ollama.Client) -> None:
    # The random model never closes its thinking unaided: everything is thinking.
    answer = client.chat(model=MODEL, messages=USER, options=SHORT, think=True)
    assert answer.message.thinking and answer.message.content == ""
    chunks = list(client.chat(model=MODEL, messages=USER, options=SHORT, think=True, stream=True))
    assert "".join(chunk.message.thinking or "" for chunk in chunks) == answer.message.thinking
    plain = client.chat(model=MODEL, messages=USER, options=SHORT, think=False)
    assert plain.message.thinking is None and plain.message.content


def test_tool_round_trip_history(client: ollama.Client, server: ServerProcess) -> None:
    history = [*USER, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
               {"role": "tool", "content": "sunny, 21C", "tool_name": "get_weather"}]
    answer = client.chat(model=MODEL, messages=history, tools=[WEATHER], options=SHORT)
    chat_history = [*USER, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                    {"role": "tool", "content": "sunny, 21C"}]
    assert answer.prompt_eval_count == prompt_tokens(server, chat_history, tools=[WEATHER])
    assert answer.done_reason in ("length", "stop")


def test_format_schema(client: ollama.Client) -> None:
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
              "additionalProperties": False}
    answer = client.chat(model=MODEL, messages=USER, format=schema, options={"num_predict": 64})
    assert answer.done_reason == "stop"
    jsonschema.validate(json.loads(answer.message.content), schema)


def test_generate(client: ollama.Client) -> None:
    answer = client.generate(model=MODEL, prompt="Why is the sky blue?", system="Be brief.", options=SHORT)
    assert answer.done and answer.done_reason == "length" and answer.response and answer.eval_count == 5
    chunks = list(client.generate(model=MODEL, prompt="Why is the sky blue?", system="Be brief.", options=SHORT,
                                  stream=True))
    assert "".join(chunk.response for chunk in chunks) == answer.response and chunks[-1].done
    loaded = client.generate(model=MODEL)
    assert loaded.done_reason == "load" and loaded.response == ""


def test_model_routes(client: ollama.Client, server: ServerProcess) -> None:
    assert [model.model for model in client.list().models] == [f"{MODEL}:latest"]
    shown = client.show(MODEL)
    assert "thinking" in shown.capabilities and "tools" in shown.capabilities
    assert shown.modelinfo["deepseek_v32.context_length"] == 1024
    running = client.ps().models
    assert [model.name for model in running] == [f"{MODEL}:latest"] and running[0].context_length == 1024
    # The client has no call for it; Ollama's own CLI reads it.
    version = httpx.get(f"{server.base_url}/api/version", headers={"Authorization": f"Bearer {API_KEY}"})
    assert version.status_code == 200 and version.json()["version"]


def test_errors(client: ollama.Client, server: ServerProcess) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="llama3.2", messages=USER)
    assert caught.value.status_code == 404 and "llama3.2" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        client.pull("llama3.2")
    assert caught.value.status_code == 400
    assert caught.value.error == "not supported: dsv32 loads a checkpoint given at start"
    for refused in (lambda: client.delete(MODEL), lambda: client.copy(MODEL, "other"),
                    lambda: client.create(model="other", from_=MODEL)):
        with pytest.raises(ollama.ResponseError, match="not supported: dsv32 loads a checkpoint"):
            refused()
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model=MODEL, messages=[{"role": "user", "content": "What is this?", "images": [b"\x89PNG"]}])
    assert caught.value.status_code == 400 and "images are not supported" in caught.value.error
    with pytest.raises(ollama.ResponseError, match="maximum context length"):
        client.chat(model=MODEL, messages=USER, options={"num_predict": 5000})
    keyless = httpx.post(f"{server.base_url}/api/chat", json={"model": MODEL, "messages": USER})
    assert keyless.status_code == 401 and list(keyless.json()) == ["error"]
