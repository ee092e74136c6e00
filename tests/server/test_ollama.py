"""Ollama's native API without a real engine: the request as the chat request it becomes, the chat parser's output
as Ollama message fields in any split, the request checks, and the routes over the scripted engine: a thinking +
text + tool-call turn as one answer and as NDJSON lines (parsed with the ``ollama`` client's own types), generate,
the model routes, the refused model-management routes and errors in Ollama's ``{"error"}`` shape. The API against a
real server, through the ``ollama`` client, is test_ollama_api.py.
"""

from __future__ import annotations

import json

import ollama
import pytest
from pydantic import ValidationError

from dsv32.encoding import Delta, ToolCallDelta
from dsv32.server.chat import render_chat_prompt
from dsv32.server.ollama import OllamaMessageParts, chat_messages, to_chat_request
from dsv32.server.ollama_protocol import OllamaChatRequest, OllamaGenerateRequest
from dsv32.server.protocol import ChatCompletionRequest
from dsv32.server.settings import ServerConfig
from dsv32.tokenizer import Tokenizer
from tests.server.test_chat_parsing import CALL
from tests.server.test_scripted_engine import TOOL_TURN, ScriptedEngine, client_for

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}
USER = [{"role": "user", "content": "Weather in Paris?"}]
STATS = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
         "eval_duration")


def chat_request(**fields: object) -> OllamaChatRequest:
    return OllamaChatRequest.model_validate({"model": "tiny", "messages": USER, **fields})


def converted(request: OllamaChatRequest) -> ChatCompletionRequest:
    return to_chat_request(request, chat_messages(request.messages), request.tools)


# ---------------------------------------------------------------------------------------------------- request


def test_tool_round_trip_becomes_chat_messages() -> None:
    request = chat_request(tools=[WEATHER], messages=[
        {"role": "system", "content": "Be brief."}, *USER,
        {"role": "assistant", "content": "Looking.", "thinking": "Need the weather.",
         "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
        {"role": "user", "content": "And tomorrow?"}])
    chat = converted(request)
    assert [m.role for m in chat.messages] == ["system", "user", "assistant", "tool", "user"]
    assistant = chat.messages[2]
    assert assistant.reasoning_content == "Need the weather." and assistant.content == "Looking."
    assert assistant.tool_calls[0].function.arguments == {"city": "Paris"}
    prompt = render_chat_prompt(chat).prompt
    assert "<function_results>\n<result>sunny</result>\n</function_results>" in prompt
    assert prompt.endswith("<｜User｜>And tomorrow?<｜Assistant｜></think>")


@pytest.mark.parametrize(("think", "thinks"), [(None, False), (False, False), (True, True), ("high", True)])
def test_think_switches_the_prompt_mode(think: object, thinks: bool) -> None:
    chat = converted(chat_request(think=think))
    assert render_chat_prompt(chat).prompt.endswith("<think>" if thinks else "</think>")


def test_format_and_options_carry_over() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    chat = converted(chat_request(format=schema, keep_alive="5m", options={
        "temperature": 0.3, "top_p": 0.9, "top_k": 20, "min_p": 0.1, "seed": 7, "num_predict": 12,
        "stop": ["END"], "repeat_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": 0.25,
        "num_ctx": 4096, "num_gpu": 1, "mirostat": 2}))
    assert chat.response_format.json_schema == {"name": "format", "schema": schema}
    assert (chat.temperature, chat.top_p, chat.top_k, chat.min_p, chat.seed, chat.max_tokens, chat.stop) == (
        0.3, 0.9, 20, 0.1, 7, 12, ["END"])
    assert (chat.repetition_penalty, chat.presence_penalty, chat.frequency_penalty) == (1.1, 0.5, 0.25)
    assert converted(chat_request(format="json")).response_format.type == "json_object"
    for no_cap in (-1, -2):
        assert converted(chat_request(options={"num_predict": no_cap})).max_tokens is None
    assert converted(chat_request(model="tiny:latest")).model == "tiny"


@pytest.mark.parametrize(("fields", "needle"), [
    ({"model": None}, "model"),
    ({"messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, "images are not supported"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
    ({"format": "xml"}, "format"),
    ({"format": {"type": "strange"}}, "JSON Schema type"),
    ({"options": {"temperature": "hot"}}, "temperature"),
    ({"options": {"num_predict": -3}}, "num_predict"),
    ({"options": {"num_predict": 0}}, "num_predict"),
    ({"think": "extreme"}, "think"),
    ({"logprobs": True}, "logprobs are not supported"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "invalid function name"),
])
def test_chat_requests_ollama_refuses_are_refused(fields: dict, needle: str) -> None:
    body = {key: value for key, value in {"model": "tiny", "messages": USER, **fields}.items() if value is not None}
    with pytest.raises(ValidationError, match=needle):
        OllamaChatRequest.model_validate(body)


@pytest.mark.parametrize(("fields", "needle"), [
    ({"raw": True}, "raw prompts"), ({"template": "{{ .Prompt }}"}, "template"), ({"suffix": "end"}, "suffix"),
    ({"context": [1, 2, 3]}, "context"), ({"images": ["aGk="]}, "images")])
def test_generate_requests_ollama_refuses_are_refused(fields: dict, needle: str) -> None:
    with pytest.raises(ValidationError, match=needle):
        OllamaGenerateRequest.model_validate({"model": "tiny", "prompt": "Hi", **fields})


# ---------------------------------------------------------------------------------------------------- output


@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_tool_calls_arrive_whole(chunk: int) -> None:
    chat = converted(chat_request(tools=[WEATHER], think=True))
    rendered = render_chat_prompt(chat)
    parser = rendered.new_parser()
    parts = OllamaMessageParts()
    text = "Let me think.</think>Checking." + CALL + CALL.replace("Paris", "Rome").removeprefix("\n\n")
    pieces = [text[i:i + chunk] for i in range(0, len(text), chunk)]
    messages = []
    for step, piece in enumerate(pieces):
        last = step == len(pieces) - 1
        messages.append(parts.feed(parser.feed(piece) + (parser.finish() if last else []), finished=last))
    assert "".join(m.get("thinking", "") for m in messages) == "Let me think."
    assert "".join(m["content"] for m in messages) == "Checking."
    calls = [call for m in messages for call in m.get("tool_calls", [])]
    assert [call["function"]["index"] for call in calls] == [0, 1]
    assert [call["function"]["arguments"]["city"] for call in calls] == ['Paris "FR"', 'Rome "FR"']
    assert all(call["function"]["arguments"]["days"] == 3 and call["id"].startswith("call_") for call in calls)


def test_forced_call_drops_text() -> None:
    parts = OllamaMessageParts(include_content=False)
    message = parts.feed([Delta(content="stray"), Delta(tool_call=ToolCallDelta(0, id="call_1", name="f")),
                          Delta(tool_call=ToolCallDelta(0, arguments='{"a": 1}'))], finished=True)
    assert message["content"] == "" and message["tool_calls"][0]["function"]["arguments"] == {"a": 1}


# ---------------------------------------------------------------------------------------------------- routes


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_pretrained("tiny")


def lines_of(response) -> list[dict]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/x-ndjson")
    assert response.text.endswith("\n")
    return [json.loads(line) for line in response.text.splitlines()]


def test_chat_answer_with_thinking_and_a_tool_call(tokenizer: Tokenizer) -> None:
    engine = ScriptedEngine(tokenizer, TOOL_TURN)
    body = {"model": "tiny:latest", "messages": USER, "tools": [WEATHER], "think": True, "stream": False}
    response = client_for(engine).post("/api/chat", json=body)
    answer = ollama.ChatResponse.model_validate(response.json())
    assert answer.model == "tiny:latest" and answer.done and answer.done_reason == "stop"
    assert answer.message.role == "assistant" and answer.message.thinking == "Need the weather."
    assert answer.message.content == "Let me check."
    assert answer.message.tool_calls[0].function.arguments == {"city": "Paris"}
    assert answer.prompt_eval_count == len(engine.calls[0][0]) and answer.eval_count == len(TOOL_TURN)
    assert answer.load_duration == 0 and answer.total_duration >= answer.prompt_eval_duration + answer.eval_duration
    assert engine.calls[0][2].endswith("<think>")


def test_chat_streams_ndjson_by_default(tokenizer: Tokenizer) -> None:
    engine = ScriptedEngine(tokenizer, TOOL_TURN)
    lines = lines_of(client_for(engine).post("/api/chat", json={"model": "tiny", "messages": USER,
                                                                "tools": [WEATHER], "think": True}))
    chunks = [ollama.ChatResponse.model_validate(line) for line in lines]
    assert [chunk.done for chunk in chunks] == [False] * (len(chunks) - 1) + [True]
    assert all(set(STATS).isdisjoint(line) for line in lines[:-1]) and set(STATS) <= set(lines[-1])
    assert lines[-1]["done_reason"] == "stop" and lines[-1]["eval_count"] == len(TOOL_TURN)
    # Thinking first, then the text, then the call once its arguments are whole; the last line has no message.
    kinds = [next(k for k in ("thinking", "tool_calls", "content") if line["message"].get(k)) for line in lines[:-1]]
    assert kinds == ["thinking", "thinking", "content", "tool_calls"]
    assert lines[-1]["message"] == {"role": "assistant", "content": ""}
    assert "".join(c.message.thinking or "" for c in chunks) == "Need the weather."
    assert "".join(c.message.content for c in chunks) == "Let me check."
    assert chunks[-2].message.tool_calls[0].function.arguments == {"city": "Paris"}


def test_generate_answers_and_streams(tokenizer: Tokenizer) -> None:
    engine = ScriptedEngine(tokenizer, ["Need ", "it.", "</think>", "Sunny", "."])
    client = client_for(engine)
    body = {"model": "tiny", "prompt": "Weather in Paris?", "system": "Be brief.", "think": True}
    answer = ollama.GenerateResponse.model_validate(client.post("/api/generate", json={**body, "stream": False})
                                                    .json())
    assert (answer.response, answer.thinking, answer.done_reason) == ("Sunny.", "Need it.", "stop")
    assert engine.calls[0][2].startswith("<｜begin▁of▁sentence｜>Be brief.<｜User｜>Weather in Paris?")
    lines = lines_of(client.post("/api/generate", json=body))
    assert "".join(line["response"] for line in lines) == "Sunny."
    assert "".join(line.get("thinking", "") for line in lines) == "Need it." and lines[-1]["done"]
    assert lines[-1]["response"] == ""


def test_options_and_format_reach_the_engine(tokenizer: Tokenizer) -> None:
    engine = ScriptedEngine(tokenizer, ["{}"])
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    client_for(engine).post("/api/chat", json={"model": "tiny", "messages": USER, "stream": False, "format": schema,
                                               "keep_alive": -1, "options": {"temperature": 0.2, "top_k": 5,
                                                                            "seed": 3, "num_predict": 9,
                                                                            "stop": ["END"]}})
    params = engine.calls[0][1]
    assert (params.temperature, params.top_k, params.seed, params.max_tokens, params.stop) == (0.2, 5, 3, 9, ["END"])
    assert params.structured_outputs.json == schema


def test_empty_conversation_only_loads(tokenizer: Tokenizer) -> None:
    engine = ScriptedEngine(tokenizer, ["x"])
    client = client_for(engine)
    for path, body in (("/api/chat", {"model": "tiny"}), ("/api/generate", {"model": "tiny"})):
        answer = client.post(path, json=body).json()
        assert answer["done"] and answer["done_reason"] == "load"
    assert engine.calls == []
    assert client.post("/api/chat", json={"model": "other"}).status_code == 404


def test_model_routes(tokenizer: Tokenizer) -> None:
    client = client_for(ScriptedEngine(tokenizer), ServerConfig(served_model_names=("dsv32", "alias")))
    listed = ollama.ListResponse.model_validate(client.get("/api/tags").json())
    assert [model.model for model in listed.models] == ["dsv32:latest", "alias:latest"]
    assert listed.models[0].details.family == "deepseek_v32"
    running = ollama.ProcessResponse.model_validate(client.get("/api/ps").json())
    assert running.models[0].context_length == 1024 and running.models[0].expires_at.year > 2100
    shown = ollama.ShowResponse.model_validate(client.post("/api/show", json={"model": "alias:latest"}).json())
    assert shown.capabilities == ["completion", "tools", "thinking"]
    assert shown.modelinfo["deepseek_v32.context_length"] == 1024
    assert client.post("/api/show", json={"name": "dsv32"}).status_code == 200
    assert client.get("/api/version").json()["version"]


@pytest.mark.parametrize(("method", "path", "body", "status", "needle"), [
    ("POST", "/api/pull", {"model": "llama3"}, 400, "not supported: dsv32 loads a checkpoint given at start"),
    ("POST", "/api/create", {"model": "x", "from": "y"}, 400, "not supported: dsv32 loads a checkpoint"),
    ("POST", "/api/push", {"model": "x"}, 400, "not supported: dsv32 loads a checkpoint"),
    ("POST", "/api/copy", {"source": "x", "destination": "y"}, 400, "not supported: dsv32 loads a checkpoint"),
    ("DELETE", "/api/delete", {"model": "x"}, 400, "not supported: dsv32 loads a checkpoint"),
    ("POST", "/api/embed", {"model": "x", "input": "hi"}, 400, "not an embedding model"),
    ("POST", "/api/chat", {"model": "llama3", "messages": USER}, 404, "llama3"),
    ("POST", "/api/show", {"model": "llama3"}, 404, "llama3"),
    ("POST", "/api/chat", {"messages": USER}, 400, "model"),
    ("POST", "/api/chat", {"model": "tiny", "messages": USER, "options": {"num_predict": 5000}}, 400,
     "maximum context length"),
    ("POST", "/api/chat", {"model": "tiny", "messages": [{"role": "assistant", "content": "x"}]}, 400,
     "messages[0]"),
    ("POST", "/api/generate", {"model": "tiny", "prompt": "x", "raw": True}, 400, "/v1/completions"),
    ("GET", "/api/chat", None, 405, "Method Not Allowed"),
    ("GET", "/api/nothing", None, 404, "Not Found"),
])
def test_errors_are_ollama_errors(tokenizer: Tokenizer, method: str, path: str, body: dict | None, status: int,
                                  needle: str) -> None:
    response = client_for(ScriptedEngine(tokenizer, ["x"])).request(method, path, json=body)
    assert response.status_code == status, response.text
    assert list(response.json()) == ["error"] and needle in response.json()["error"]


def test_invalid_json_is_an_ollama_error(tokenizer: Tokenizer) -> None:
    response = client_for(ScriptedEngine(tokenizer)).post("/api/chat", content=b'{"model": ',
                                                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and "Invalid JSON" in response.json()["error"]


def test_api_routes_need_the_key(tokenizer: Tokenizer) -> None:
    client = client_for(ScriptedEngine(tokenizer, ["x"]), ServerConfig(api_key="secret"))
    refused = client.post("/api/chat", json={"model": "tiny", "messages": USER, "stream": False})
    assert refused.status_code == 401 and "Unauthorized" in refused.json()["error"]
    assert client.post("/api/chat", json={"model": "tiny", "messages": USER, "stream": False},
                       headers={"Authorization": "Bearer secret"}).status_code == 200
