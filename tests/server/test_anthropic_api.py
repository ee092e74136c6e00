"""Anthropic's Messages API of a real `dsv32 serve` (tiny model, random weights), driven with the official `anthropic`
SDK and raw HTTP: plain and streamed messages (the exact event sequence), thinking blocks, a full tool_use ->
tool_result round trip (streamed and not, the call forced by ``tool_choice``), stop sequences, the prefix cache's
``cache_read_input_tokens``, count_tokens, both auth headers, and errors in Anthropic's envelope.

The model's text is noise: tests pin shapes, counts and stop reasons. A forced tool call is valid because the
tool-call grammar makes it so; ``logit_bias`` on ``</think>`` makes the random model end its thinking.
"""

from __future__ import annotations

import json

import anthropic
import httpx
import jsonschema
import pytest

from tests.server.conftest import API_KEY, ServerProcess

pytestmark = pytest.mark.e2e

MODEL = "dsv32-tiny"
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"name": "get_weather", "description": "Current weather of a city", "input_schema": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer", "minimum": 1,
                                                                                   "maximum": 7}},
    "required": ["city", "days"]}}
# Exactly max_tokens output tokens whatever the random model samples (vLLM's extension, through extra_body).
FIXED = {"ignore_eos": True}
# Long enough that the prefix cache (64-token blocks) holds part of it on the second request.
LONG_SYSTEM = "You are a careful assistant who answers in one short sentence. " * 20


@pytest.fixture(scope="module")
def server(server_factory) -> ServerProcess:
    return server_factory("tiny", "--api-key", API_KEY, "--served-model-name", MODEL)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> httpx.Client:
    with httpx.Client(base_url=server.base_url, headers={"x-api-key": API_KEY}, timeout=120) as session:
        yield session


@pytest.fixture(scope="module")
def think_end(http: httpx.Client) -> str:
    """The ``</think>`` token id, as a logit_bias key."""
    return str(http.post("/tokenize", json={"prompt": "</think>"}).json()["tokens"][-1])


def events_of(response: httpx.Response) -> list[tuple[str, dict]]:
    """(event name, data) of each SSE event; the name must match the data's type, as in Anthropic's stream."""
    events = []
    for frame in response.text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in frame.split("\n"))
        data = json.loads(lines["data"])
        assert lines["event"] == data["type"]
        events.append((lines["event"], data))
    return events


def count(client: anthropic.Anthropic, **fields: object) -> int:
    return client.messages.count_tokens(model=MODEL, **fields).input_tokens


# ---------------------------------------------------------------------------------------------------- messages


def test_plain_message(client: anthropic.Anthropic) -> None:
    raw = client.messages.with_raw_response.create(model=MODEL, max_tokens=5, messages=USER, system="Be brief.",
                                                   extra_body=FIXED)
    message = raw.parse()
    assert raw.headers["request-id"] == message.id and message.id.startswith("msg-")
    assert message.type == "message" and message.role == "assistant" and message.model == MODEL
    assert [block.type for block in message.content] == ["text"] and message.content[0].text
    assert message.stop_reason == "max_tokens" and message.stop_sequence is None
    usage = message.usage
    assert usage.output_tokens == 5 and usage.cache_creation_input_tokens == 0
    assert usage.input_tokens + usage.cache_read_input_tokens == count(client, messages=USER, system="Be brief.")


def test_streamed_message_sends_anthropics_event_sequence(client: anthropic.Anthropic, http: httpx.Client) -> None:
    response = http.post("/v1/messages", json={"model": MODEL, "max_tokens": 4, "messages": USER, "stream": True,
                                               **FIXED})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = events_of(response)
    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[2:-3]) == {"content_block_delta"}
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["output_tokens"] == 0
    assert events[1][1]["content_block"] == {"type": "text", "text": ""}
    assert all(data["delta"]["type"] == "text_delta" for name, data in events if name == "content_block_delta")
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 4
    assert delta["usage"]["input_tokens"] == start["usage"]["input_tokens"]

    with client.messages.stream(model=MODEL, max_tokens=4, messages=USER, extra_body=FIXED) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.content[0].text == text and final.stop_reason == "max_tokens" and final.usage.output_tokens == 4


def test_prefix_cache_hits_are_cache_read_input_tokens(client: anthropic.Anthropic) -> None:
    prompt = count(client, messages=USER, system=LONG_SYSTEM)
    for _ in range(2):
        usage = client.messages.create(model=MODEL, max_tokens=1, system=LONG_SYSTEM, messages=USER).usage
        assert usage.input_tokens + usage.cache_read_input_tokens == prompt
    assert usage.cache_read_input_tokens >= 64  # the second request found the first one's blocks


def test_stop_sequence(client: anthropic.Anthropic) -> None:
    # Random text over a 128k vocabulary holds a space or an "e" within a few tokens.
    message = client.messages.create(model=MODEL, max_tokens=64, messages=USER, stop_sequences=[" ", "e"],
                                     extra_body={"seed": 1})
    assert message.stop_reason == "stop_sequence" and message.stop_sequence in (" ", "e")
    assert all(message.stop_sequence not in block.text for block in message.content)


def test_thinking_is_returned_as_thinking_blocks(client: anthropic.Anthropic, think_end: str) -> None:
    thinking = {"type": "enabled", "budget_tokens": 4}
    message = client.messages.create(model=MODEL, max_tokens=6, messages=USER, thinking=thinking, extra_body=FIXED)
    # The random model never closes its thinking unaided: everything is thinking.
    assert [block.type for block in message.content] == ["thinking"]
    assert message.content[0].thinking and message.content[0].signature == ""
    assert count(client, messages=USER, thinking=thinking) > 0
    # With </think> favoured it thinks, then answers: a thinking block and a text block.
    both = [client.messages.create(model=MODEL, max_tokens=24, messages=USER, thinking=thinking,
                                   extra_body={"seed": seed, "logit_bias": {think_end: 10}}) for seed in range(4)]
    assert any([block.type for block in m.content] == ["thinking", "text"] for m in both), [m.content for m in both]


def test_thinking_is_streamed_as_thinking_deltas(client: anthropic.Anthropic, think_end: str) -> None:
    kinds = set()
    for seed in range(4):
        with client.messages.stream(model=MODEL, max_tokens=24, messages=USER,
                                    thinking={"type": "enabled", "budget_tokens": 8},
                                    extra_body={"seed": seed, "logit_bias": {think_end: 10}}) as stream:
            deltas = [event.delta.type for event in stream if event.type == "content_block_delta"]
            final = stream.get_final_message()
        kinds.update(deltas)
        if [block.type for block in final.content] == ["thinking", "text"]:
            assert deltas.index("text_delta") > max(i for i, kind in enumerate(deltas) if kind == "thinking_delta")
            break
    assert {"thinking_delta", "text_delta"} <= kinds


def test_omitted_thinking_is_not_returned(client: anthropic.Anthropic) -> None:
    message = client.messages.create(model=MODEL, max_tokens=4, messages=USER, extra_body=FIXED,
                                     thinking={"type": "enabled", "budget_tokens": 2, "display": "omitted"})
    assert message.content == [] and message.usage.output_tokens == 4


# ---------------------------------------------------------------------------------------------------- tools


def check_tool_use(message) -> anthropic.types.ToolUseBlock:
    """The message is exactly one valid call of get_weather."""
    assert message.stop_reason == "tool_use", message
    assert [block.type for block in message.content] == ["tool_use"]
    call = message.content[0]
    assert call.name == "get_weather" and call.id.startswith("toolu_")
    jsonschema.validate(call.input, WEATHER["input_schema"])
    return call


def second_turn(first) -> list[dict]:
    """The conversation after the model's tool call: its message sent back as it came, and the tool's result."""
    call = first.content[0]
    return [*USER, first.to_param(),
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny, 21C"}]}]


def test_tool_round_trip(client: anthropic.Anthropic) -> None:
    first = client.messages.create(model=MODEL, max_tokens=400, messages=USER, tools=[WEATHER],
                                   tool_choice={"type": "any", "disable_parallel_tool_use": True})
    check_tool_use(first)
    history = second_turn(first)
    answer = client.messages.create(model=MODEL, max_tokens=5, messages=history, tools=[WEATHER], extra_body=FIXED)
    assert [block.type for block in answer.content] == ["text"] and answer.stop_reason == "max_tokens"
    # The tools, the call and its result are all in the prompt, and the prefix cache holds the first turn's blocks.
    usage = answer.usage
    assert usage.input_tokens + usage.cache_read_input_tokens == count(client, messages=history, tools=[WEATHER])
    assert usage.cache_read_input_tokens > 0
    # In thinking mode the turn after a tool result starts in thinking.
    thought = client.messages.create(model=MODEL, max_tokens=5, messages=history, tools=[WEATHER],
                                     thinking={"type": "enabled", "budget_tokens": 4}, extra_body=FIXED)
    assert thought.content[0].type == "thinking"


def test_tool_round_trip_streamed(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model=MODEL, max_tokens=400, messages=USER, tools=[WEATHER],
                                tool_choice={"type": "tool", "name": "get_weather",
                                             "disable_parallel_tool_use": True}) as stream:
        events = list(stream)
        first = stream.get_final_message()
    call = check_tool_use(first)
    starts = [event.content_block for event in events if event.type == "content_block_start"]
    assert [(block.type, block.id, block.name, block.input) for block in starts] == [
        ("tool_use", call.id, "get_weather", {})]
    partial = "".join(event.delta.partial_json for event in events
                      if event.type == "content_block_delta" and event.delta.type == "input_json_delta")
    assert json.loads(partial) == call.input
    with client.messages.stream(model=MODEL, max_tokens=5, messages=second_turn(first), tools=[WEATHER],
                                extra_body=FIXED) as stream:
        answer = stream.get_final_message()
    assert answer.stop_reason in ("max_tokens", "tool_use") and answer.usage.output_tokens == 5


def test_tool_choice_none_renders_no_tools(client: anthropic.Anthropic) -> None:
    with_tools = count(client, messages=USER, tools=[WEATHER])
    assert count(client, messages=USER, tools=[WEATHER], tool_choice={"type": "none"}) == count(client,
                                                                                                  messages=USER)
    assert with_tools > count(client, messages=USER) + 50  # the tool's schema and the calling instructions
    message = client.messages.create(model=MODEL, max_tokens=4, messages=USER, tools=[WEATHER],
                                     tool_choice={"type": "none"}, extra_body=FIXED)
    assert all(block.type == "text" for block in message.content)


# ---------------------------------------------------------------------------------------------------- auth, errors


def test_both_auth_headers_are_accepted(server: ServerProcess) -> None:
    bearer = anthropic.Anthropic(base_url=server.base_url, api_key=None, auth_token=API_KEY, max_retries=0)
    assert bearer.messages.count_tokens(model=MODEL, messages=USER).input_tokens > 0
    wrong = anthropic.Anthropic(base_url=server.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as caught:
        wrong.messages.create(model=MODEL, max_tokens=1, messages=USER)
    assert caught.value.body["error"]["type"] == "authentication_error"
    keyless = httpx.post(f"{server.base_url}/v1/messages", json={"model": MODEL, "max_tokens": 1, "messages": USER})
    anthropic_error_of(keyless, 401, "authentication_error")


def anthropic_error_of(response: httpx.Response, status: int, kind: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
    assert body["error"]["type"] == kind and body["error"]["message"]
    return body["error"]["message"]


BASE = {"model": MODEL, "max_tokens": 4, "messages": USER}


@pytest.mark.parametrize(("body", "status", "kind", "needle"), [
    ({"model": MODEL, "messages": USER}, 400, "invalid_request_error", "max_tokens"),
    ({**BASE, "model": "claude-x"}, 404, "not_found_error", "claude-x"),
    ({**BASE, "max_tokens": 5000}, 400, "invalid_request_error", "maximum context length"),
    ({**BASE, "temperature": 2}, 400, "invalid_request_error", "temperature"),
    ({**BASE, "top_p": 0}, 400, "invalid_request_error", "top_p"),
    ({**BASE, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, 400,
     "invalid_request_error", "image"),
    ({**BASE, "thinking": {"type": "enabled", "budget_tokens": 4}}, 400, "invalid_request_error", "budget_tokens"),
    ({**BASE, "tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}}, 400, "invalid_request_error",
     "nope"),
    ({**BASE, "tools": [{"type": "bash_20250124", "name": "bash"}]}, 400, "invalid_request_error", "server tools"),
    # A rendering error names the Anthropic message, not the chat message it became.
    ({**BASE, "system": "s", "messages": [*USER, {"role": "assistant", "content": "a"}, {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "r"}]}]}, 400, "invalid_request_error",
     "messages[2]: tool result"),
    ({**BASE, "messages": [{"role": "user", "content": "\ud800"}]}, 400, "invalid_request_error", "surrogate"),
])
def test_malformed_requests_get_anthropic_errors(http: httpx.Client, body: dict, status: int, kind: str,
                                                 needle: str) -> None:
    response = http.post("/v1/messages", content=json.dumps(body), headers={"content-type": "application/json"})
    assert needle in anthropic_error_of(response, status, kind)


def test_malformed_bodies_get_anthropic_errors(http: httpx.Client) -> None:
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        response = http.post(path, content=b'{"model": ', headers={"content-type": "application/json"})
        assert "Invalid JSON" in anthropic_error_of(response, 400, "invalid_request_error")
        response = http.post(path, content=b"[1, 2]", headers={"content-type": "application/json"})
        anthropic_error_of(response, 400, "invalid_request_error")
        response = http.post(path, content=b'{"model": "x", "max_tokens": NaN}',
                             headers={"content-type": "application/json"})
        assert "finite" in anthropic_error_of(response, 400, "invalid_request_error")
    anthropic_error_of(http.get("/v1/messages"), 405, "invalid_request_error")
    anthropic_error_of(http.post("/v1/messages/batches", json={}), 404, "not_found_error")
    # The OpenAI routes keep OpenAI's envelope.
    assert set(http.post("/v1/chat/completions", json={}).json()["error"]) == {"message", "type", "param", "code"}


def test_sdk_raises_its_own_error_classes(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="claude-x", max_tokens=1, messages=USER)
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.count_tokens(model=MODEL, messages=[])
    assert caught.value.body["error"]["type"] == "invalid_request_error"
