"""OpenAI's Responses API of a real `dsv32 serve` (tiny model, random weights), driven with the official `openai` SDK
(``responses.create`` / ``.stream`` / ``.retrieve`` / ``.delete`` / ``.cancel``): a length cut (status "incomplete"),
the streamed events, reasoning items, a forced tool call and its round trip through ``previous_response_id``,
structured output, the prefix cache's ``cached_tokens``, background runs and their cancelling, and errors.

The model's text is noise: tests pin shapes, counts and statuses. A forced tool call and a JSON schema answer are
valid because their grammars make them so; ``logit_bias`` on ``</think>`` makes the random model end its thinking.
"""

from __future__ import annotations

import json
import time

import httpx
import jsonschema
import openai
import pytest

from tests.server.conftest import API_KEY, ServerProcess

pytestmark = pytest.mark.e2e

MODEL = "dsv32-tiny"
QUESTION = "What is the weather in Paris?"
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather of a city", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer", "minimum": 1,
                                                                                   "maximum": 7}},
    "required": ["city", "days"]}}
# Exactly max_output_tokens output tokens whatever the random model samples (vLLM's extension, through extra_body).
FIXED = {"ignore_eos": True}
LONG_INSTRUCTIONS = "You are a careful assistant who answers in one short sentence. " * 20


@pytest.fixture(scope="module")
def server(server_factory) -> ServerProcess:
    return server_factory("tiny", "--api-key", API_KEY, "--served-model-name", MODEL)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def think_end(server: ServerProcess) -> str:
    """The ``</think>`` token id, as a logit_bias key."""
    return str(httpx.post(f"{server.base_url}/tokenize", json={"prompt": "</think>"}).json()["tokens"][-1])


def prompt_tokens(server: ServerProcess, **chat: object) -> int:
    """The prompt the chat route renders for the same conversation."""
    return httpx.post(f"{server.base_url}/tokenize", json={"model": MODEL, **chat}).json()["count"]


def final_of(events: list) -> openai.types.responses.Response:
    """The response a stream ended with. (The SDK's ``get_final_response`` knows only ``response.completed``; a
    length cut ends with ``response.incomplete``, as OpenAI's own stream does.)"""
    assert events[-1].type in ("response.completed", "response.incomplete")
    return events[-1].response


def test_a_length_cut_is_incomplete(client: openai.OpenAI, server: ServerProcess) -> None:
    raw = client.responses.with_raw_response.create(model=MODEL, input=QUESTION, instructions="Be brief.",
                                                    max_output_tokens=5, extra_body=FIXED)
    response = raw.parse()
    assert raw.headers["x-request-id"].startswith("resp-") and response.id.startswith("resp_")
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert [item.type for item in response.output] == ["message"] and response.output_text
    assert response.output[0].status == "incomplete"
    usage = response.usage
    assert usage.output_tokens == 5 and usage.output_tokens_details.reasoning_tokens == 0
    assert usage.input_tokens == prompt_tokens(server, messages=[{"role": "system", "content": "Be brief."},
                                                                 {"role": "user", "content": QUESTION}])
    assert response.model == MODEL and response.max_output_tokens == 5 and response.instructions == "Be brief."


def test_stream_sends_openais_events(client: openai.OpenAI) -> None:
    with client.responses.stream(model=MODEL, input=QUESTION, max_output_tokens=4, extra_body=FIXED) as stream:
        events = list(stream)
    final = final_of(events)
    kinds = [event.type for event in events]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert final.output_text == text and final.status == "incomplete" and final.usage.output_tokens == 4
    assert client.responses.retrieve(final.id).output_text == text


def test_reasoning_items(client: openai.OpenAI, think_end: str) -> None:
    response = client.responses.create(model=MODEL, input=QUESTION, reasoning={"effort": "high"},
                                       max_output_tokens=6, extra_body=FIXED)
    # The random model never closes its thinking unaided: everything is reasoning.
    assert [item.type for item in response.output] == ["reasoning"]
    assert response.output[0].content[0].text and response.usage.output_tokens_details.reasoning_tokens == 6
    # With </think> favoured it thinks, then answers: a reasoning item and a message; streamed, in that order.
    for seed in range(4):
        with client.responses.stream(model=MODEL, input=QUESTION, reasoning={"effort": "high"},
                                     max_output_tokens=24,
                                     extra_body={"seed": seed, "logit_bias": {think_end: 10}}) as stream:
            events = list(stream)
        kinds = [event.type for event in events if event.type.endswith(".delta")]
        final = final_of(events)
        if [item.type for item in final.output] == ["reasoning", "message"]:
            break
    assert [item.type for item in final.output] == ["reasoning", "message"], final.output
    assert kinds.index("response.output_text.delta") > kinds.index("response.reasoning_text.delta")
    reasoning = final.usage.output_tokens_details.reasoning_tokens
    assert 0 < reasoning < final.usage.output_tokens


def test_forced_tool_call_and_its_round_trip(client: openai.OpenAI, server: ServerProcess) -> None:
    first = client.responses.create(model=MODEL, input=QUESTION, tools=[WEATHER], tool_choice="required",
                                    parallel_tool_calls=False, max_output_tokens=400, instructions=LONG_INSTRUCTIONS)
    assert first.status == "completed" and [item.type for item in first.output] == ["function_call"]
    call = first.output[0]
    assert call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    answer = client.responses.create(
        model=MODEL, previous_response_id=first.id, tools=[WEATHER], max_output_tokens=5, extra_body=FIXED,
        instructions=LONG_INSTRUCTIONS,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21C"}])
    assert answer.previous_response_id == first.id and answer.usage.output_tokens == 5
    # The first turn's prompt is a prefix of the second's: the prefix cache holds its blocks.
    assert answer.usage.input_tokens_details.cached_tokens >= 64
    # The same conversation sent whole (the call replayed as an input item) renders the same prompt.
    whole = client.responses.create(
        model=MODEL, tools=[WEATHER], max_output_tokens=1, instructions=LONG_INSTRUCTIONS,
        input=[{"role": "user", "content": QUESTION}, call.model_dump(exclude_none=True),
               {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21C"}])
    assert whole.usage.input_tokens == answer.usage.input_tokens


def test_streamed_tool_call(client: openai.OpenAI) -> None:
    with client.responses.stream(model=MODEL, input=QUESTION, tools=[WEATHER], max_output_tokens=400,
                                 tool_choice={"type": "function", "name": "get_weather"}) as stream:
        events = list(stream)
        final = stream.get_final_response()
    call = final.output[0]
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert arguments == call.arguments and final.status == "completed"
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and done[0].arguments == arguments
    jsonschema.validate(json.loads(arguments), WEATHER["parameters"])


def test_json_schema_output(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
              "additionalProperties": False}
    response = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=64,
                                       text={"format": {"type": "json_schema", "name": "city", "schema": schema,
                                                        "strict": True}})
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), schema)
    assert response.text.format.type == "json_schema"


def test_retrieve_and_delete(client: openai.OpenAI) -> None:
    response = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=2)
    assert client.responses.retrieve(response.id).model_dump() == response.model_dump()
    client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError, match="Previous response"):
        client.responses.create(model=MODEL, input=QUESTION, previous_response_id=response.id)


def test_background_response_and_cancel(client: openai.OpenAI) -> None:
    started = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=3, background=True)
    assert started.status == "in_progress" and started.background
    deadline = time.monotonic() + 60
    while (polled := client.responses.retrieve(started.id)).status == "in_progress":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert polled.status == "incomplete" and polled.usage.output_tokens == 3
    # Long enough (the whole context) that the cancel comes first.
    long = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=900, background=True,
                                   extra_body=FIXED)
    cancelled = client.responses.cancel(long.id)
    assert cancelled.status == "cancelled" and cancelled.usage.output_tokens < 900
    assert client.responses.retrieve(long.id).status == "cancelled"


def error_of(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    return error["message"]


@pytest.mark.parametrize(("body", "status", "needle"), [
    ({"input": QUESTION, "tools": [{"type": "web_search_preview"}]}, 400, "not supported"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]}, 400,
     "'input_image' is not supported"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file_1"}]}]}, 400, "input_file"),
    ({"input": QUESTION, "max_output_tokens": 5000}, 400, "maximum context length"),
    ({"input": QUESTION, "model": "gpt-5"}, 404, "gpt-5"),
    ({"input": QUESTION, "previous_response_id": "resp_nope"}, 404, "resp_nope"),
    ({"input": "\ud800"}, 400, "surrogate"),
    ({"input": QUESTION, "background": True, "stream": True}, 400, "background"),
])
def test_malformed_requests_get_openai_errors(server: ServerProcess, body: dict, status: int, needle: str) -> None:
    response = httpx.post(f"{server.base_url}/v1/responses", content=json.dumps({"model": MODEL, **body}),
                          headers={"content-type": "application/json", "authorization": f"Bearer {API_KEY}"})
    assert needle in error_of(response, status)
