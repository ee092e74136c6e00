"""OpenAI's Responses API without a real engine: the request as the chat request it becomes, the chat parser's output
as output items and stream events in any split, the request checks, and the routes over the scripted engine driven
by the official ``openai`` SDK (its stream accumulator checks every event): a reasoning + text + tool-call turn
streamed and not, a tool round trip through ``previous_response_id``, the store's bounds, background runs, and
errors in OpenAI's envelope. The API against a real server is test_responses_api.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import openai
import pytest
from pydantic import ValidationError

from dsv32.encoding import Delta, ToolCallDelta
from dsv32.encoding.encode import EOS_TOKEN
from dsv32.engine.outputs import CompletionOutput, RequestOutput
from dsv32.server.chat import render_chat_prompt
from dsv32.server.responses import OutputItems, final_status, to_chat_request
from dsv32.server.responses_protocol import ResponsesRequest
from dsv32.server.settings import ServerConfig
from dsv32.tokenizer import Tokenizer
from tests.server.test_chat_parsing import CALL
from tests.server.test_scripted_engine import TOOL_TURN, ScriptedEngine, client_for

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}


def responses_request(**fields: object) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"model": "tiny", "input": "Weather in Paris?", **fields})


def run(request: ResponsesRequest, text: str, chunk: int) -> tuple[list[dict], list[dict]]:
    """Render ``request``, feed ``text`` as the completion in ``chunk``-character pieces: (events, output items)."""
    chat, _, _ = to_chat_request(request)
    rendered = render_chat_prompt(chat)
    parser = rendered.new_parser()
    items = OutputItems(include_text=not rendered.forces_tool_call)
    events: list[dict] = []
    pieces = [text[i:i + chunk] for i in range(0, len(text), chunk)]
    for step, piece in enumerate(pieces):
        events += items.feed(parser.feed(piece) + (parser.finish() if step == len(pieces) - 1 else []))
    events += items.close()
    return events, items.items


def check_event_order(events: list[dict]) -> None:
    """Each item is added, built and done before the next one is added; its deltas add up to the done item."""
    open_index = None
    built: dict = {}
    for event in events:
        kind = event["type"]
        if kind == "response.output_item.added":
            assert open_index is None and event["output_index"] == (0 if not built else max(built) + 1)
            open_index = event["output_index"]
            built[open_index] = ""
        elif kind == "response.output_item.done":
            item = event["item"]
            assert event["output_index"] == open_index and item["status"] == "completed"
            whole = item["arguments"] if item["type"] == "function_call" else item["content"][0]["text"]
            assert built[open_index] == whole
            open_index = None
        else:
            assert event["output_index"] == open_index
            if kind.endswith(".delta"):
                built[open_index] += event["delta"]
    assert open_index is None


# ---------------------------------------------------------------------------------------------------- request


def test_tool_round_trip_items_become_chat_messages() -> None:
    request = responses_request(
        instructions="Be brief.", tools=[WEATHER],
        input=[{"role": "user", "content": "Weather in Paris?"},
               {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "Need it."}]},
               {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Looking."}]},
               {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
               {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
               {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "And tomorrow?"}]}])
    chat, origins, conversation = to_chat_request(request)
    assert [m.role for m in chat.messages] == ["system", "user", "assistant", "tool", "user"]
    assert origins == ["instructions", "input[0]", "input[2]", "input[4]", "input[5]"]
    assistant = chat.messages[2]
    assert assistant.content == "Looking." and assistant.reasoning_content == "Need it."
    assert assistant.tool_calls[0].id == "call_1" and assistant.tool_calls[0].function.name == "get_weather"
    assert chat.messages[3].tool_call_id == "call_1" and chat.messages[3].content == "sunny"
    assert chat.tools[0].function.parameters == WEATHER["parameters"]
    # The stored conversation leaves the instructions out: a later turn does not inherit them.
    assert [m["role"] for m in conversation] == ["user", "assistant", "tool", "user"]
    prompt = render_chat_prompt(chat).prompt
    assert "<function_results>\n<result>sunny</result>\n</function_results>" in prompt
    assert prompt.endswith("<｜User｜>And tomorrow?<｜Assistant｜></think>")


def test_history_comes_before_the_input_and_after_the_instructions() -> None:
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    chat, origins, conversation = to_chat_request(responses_request(instructions="New rules."), history)
    assert [m.role for m in chat.messages] == ["system", "user", "assistant", "user"]
    assert origins == ["instructions", "previous_response_id", "previous_response_id", "input"]
    assert conversation == [*history, {"role": "user", "content": "Weather in Paris?"}]


@pytest.mark.parametrize(("reasoning", "thinks"), [
    (None, False), ({"effort": "none"}, False), ({"effort": "low"}, True), ({"effort": "high"}, True),
    ({"summary": "auto"}, True)])
def test_reasoning_effort_switches_the_prompt_mode(reasoning: dict | None, thinks: bool) -> None:
    chat, _, _ = to_chat_request(responses_request(reasoning=reasoning))
    assert render_chat_prompt(chat).prompt.endswith("<think>" if thinks else "</think>")


def test_fields_carry_over_to_the_chat_request() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    chat, _, _ = to_chat_request(responses_request(
        tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"}, parallel_tool_calls=False,
        max_output_tokens=50, temperature=0.5, top_p=0.9, seed=3, top_k=7, ignore_eos=True,
        text={"format": {"type": "json_schema", "name": "city", "schema": schema, "strict": True}}))
    assert chat.tool_choice.function.name == "get_weather" and chat.parallel_tool_calls is False
    assert (chat.max_tokens, chat.temperature, chat.top_p, chat.seed, chat.top_k, chat.ignore_eos) == (
        50, 0.5, 0.9, 3, 7, True)
    assert chat.response_format.json_schema == {"name": "city", "schema": schema, "strict": True}
    chat, _, _ = to_chat_request(responses_request(text={"format": {"type": "json_object"}}))
    assert chat.response_format.type == "json_object"


@pytest.mark.parametrize(("fields", "needle"), [
    ({"tools": [{"type": "web_search"}]}, "'web_search' is not supported"),
    ({"tools": [{**WEATHER, "name": "bad name"}]}, "invalid function name"),
    ({"tools": [WEATHER, WEATHER]}, "unique"),
    ({"tool_choice": "required"}, "needs tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "other"}}, "not in tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "web_search_preview"}}, "not supported"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "'input_image'"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "'input_file'"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "'item_reference' is not supported"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": [{"type": "input_image"}]}]},
     "text only"),
    ({"background": True, "store": False}, "needs store=true"),
    ({"background": True, "stream": True}, "not supported"),
    ({"truncation": "auto"}, "truncation"),
    ({"top_logprobs": 2}, "logprobs"),
    ({"include": ["message.output_text.logprobs"]}, "logprobs"),
    ({"conversation": "conv_1"}, "Conversations API"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt templates"),
    ({"text": {"format": {"type": "json_schema", "schema": {}}}}, "name and text.format.schema are required"),
    ({"temperature": 2.5}, "temperature"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"reasoning": {"effort": "extreme"}}, "effort"),
])
def test_requests_openai_refuses_are_refused(fields: dict, needle: str) -> None:
    with pytest.raises(ValidationError, match=needle):
        responses_request(**fields)


# ---------------------------------------------------------------------------------------------------- output


@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_reasoning_text_and_call_are_three_items(chunk: int) -> None:
    events, items = run(responses_request(reasoning={"effort": "high"}, tools=[WEATHER]),
                        "Let me think.</think>Checking." + CALL, chunk)
    check_event_order(events)
    assert [item["type"] for item in items] == ["reasoning", "message", "function_call"]
    assert items[0]["content"] == [{"type": "reasoning_text", "text": "Let me think."}]
    assert items[1]["content"][0]["text"] == "Checking." and items[1]["role"] == "assistant"
    call = items[2]
    assert call["name"] == "get_weather" and call["call_id"].startswith("call_") and call["id"].startswith("fc_")
    assert json.loads(call["arguments"]) == {"city": 'Paris "FR"', "days": 3}
    kinds = [event["type"] for event in events if event["output_index"] == 0]
    assert kinds[:2] == ["response.output_item.added", "response.content_part.added"]
    assert kinds[-3:] == ["response.reasoning_text.done", "response.content_part.done", "response.output_item.done"]


def test_forced_tool_call_drops_text() -> None:
    _, items = run(responses_request(tools=[WEATHER], tool_choice="required"), "stray" + CALL, 3)
    assert [item["type"] for item in items] == ["function_call"]


def test_text_inside_a_tool_call_follows_its_item() -> None:
    items = OutputItems()
    events = items.feed([Delta(tool_call=ToolCallDelta(0, id="call_1", name="f")),
                         Delta(tool_call=ToolCallDelta(0, arguments='{"a": ')),
                         Delta(content="stray"),
                         Delta(tool_call=ToolCallDelta(0, arguments="1}"))]) + items.close()
    check_event_order(events)
    assert [item["type"] for item in items.items] == ["function_call", "message"]
    assert items.items[1]["content"][0]["text"] == "stray"


def test_a_length_cut_is_incomplete() -> None:
    _, items = run(responses_request(), "It is" + EOS_TOKEN, 100)
    assert final_status(SimpleNamespace(finish_reason="length")) == ("incomplete", {"reason": "max_output_tokens"})
    assert final_status(SimpleNamespace(finish_reason="stop")) == ("completed", None)
    assert items[0]["content"][0]["text"] == "It is"


# ---------------------------------------------------------------------------------------------------- routes


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_pretrained("tiny")


def sdk(engine: ScriptedEngine, config: ServerConfig | None = None) -> Iterator[openai.OpenAI]:
    # One TestClient kept open: one event loop for every request, so a background run outlives its request.
    with client_for(engine, config) as http:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)


@pytest.fixture
def engine(tokenizer: Tokenizer) -> ScriptedEngine:
    return ScriptedEngine(tokenizer, TOOL_TURN)


@pytest.fixture
def client(engine: ScriptedEngine) -> Iterator[openai.OpenAI]:
    yield from sdk(engine)


def test_reasoning_text_and_tool_call_response(client: openai.OpenAI, engine: ScriptedEngine) -> None:
    response = client.responses.create(model="tiny", input="Weather in Paris?", tools=[WEATHER],
                                       reasoning={"effort": "high"}, metadata={"k": "v"})
    assert response.status == "completed" and response.id.startswith("resp_") and response.object == "response"
    assert [item.type for item in response.output] == ["reasoning", "message", "function_call"]
    assert response.output[0].content[0].text == "Need the weather."
    assert response.output_text == "Let me check."
    call = response.output[2]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    usage = response.usage
    prompt_ids = engine.calls[0][0]
    assert usage.input_tokens == len(prompt_ids) and usage.output_tokens == len(TOOL_TURN)
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens == 0
    assert response.metadata == {"k": "v"} and response.reasoning.effort == "high"
    assert engine.calls[0][2].endswith("<think>")


def test_stream_events_in_openais_order(client: openai.OpenAI) -> None:
    with client.responses.stream(model="tiny", input="Weather in Paris?", tools=[WEATHER],
                                 reasoning={"effort": "high"}) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert [event.sequence_number for event in events] == list(range(len(events)))
    kinds = [event.type for event in events]
    item = ["response.output_item.added", "response.content_part.added"]
    done = ["response.content_part.done", "response.output_item.done"]
    expected = ["response.created", "response.in_progress",
                *item, "response.reasoning_text.delta", "response.reasoning_text.delta",
                "response.reasoning_text.done", *done,
                *item, "response.output_text.delta", "response.output_text.done", *done,
                "response.output_item.added", "response.function_call_arguments.delta",
                "response.function_call_arguments.delta", "response.function_call_arguments.done",
                "response.output_item.done", "response.completed"]
    assert kinds == expected
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    assert final.status == "completed" and final.output_text == "Let me check."
    assert [item.type for item in final.output] == ["reasoning", "message", "function_call"]
    # What was streamed is what is stored.
    stored = client.responses.retrieve(final.id)
    assert stored.model_dump(exclude={"output"}) == final.model_dump(exclude={"output"})
    assert [item.model_dump() for item in stored.output] == [
        {**item.model_dump(exclude={"parsed_arguments"}), **({"content": [
            {k: v for k, v in part.items() if k != "parsed"} for part in item.model_dump()["content"]]}
            if item.type == "message" else {})} for item in final.output]


@pytest.mark.parametrize("reasoning", [None, {"effort": "high"}])
def test_tool_round_trip_through_previous_response_id(client: openai.OpenAI, engine: ScriptedEngine,
                                                      reasoning: dict | None) -> None:
    thinking = {} if reasoning is None else {"reasoning": reasoning}
    first = client.responses.create(model="tiny", input="Weather in Paris?", instructions="Use tools.",
                                    tools=[WEATHER], **thinking)
    call = first.output[-1]
    client.responses.create(model="tiny", previous_response_id=first.id, tools=[WEATHER], **thinking,
                            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    prompt = engine.calls[1][2]
    assert "Use tools." not in prompt  # instructions are not carried over
    assert prompt.count("Weather in Paris?") == 1 and '<｜DSML｜invoke name="get_weather">' in prompt
    assert "<function_results>\n<result>sunny</result>\n</function_results>" in prompt
    # In thinking mode the tool-call turn keeps its reasoning, and the next turn starts thinking.
    assert ("<think>Need the weather.</think>" in prompt) == (reasoning is not None)
    assert prompt.endswith("<think>" if reasoning else "</think>")
    # The same turn with the first response's output items sent back as input, as SDK users do by hand.
    replayed = [item.model_dump(exclude_none=True) for item in first.output]
    client.responses.create(model="tiny", tools=[WEATHER], **thinking, input=[
        {"role": "user", "content": "Weather in Paris?"}, *replayed,
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert engine.calls[2][2] == prompt


def test_structured_output_reaches_the_engine(client: openai.OpenAI, engine: ScriptedEngine) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    client.responses.create(model="tiny", input="Weather in Paris?",
                            text={"format": {"type": "json_schema", "name": "city", "schema": schema}})
    client.responses.create(model="tiny", input="Weather in Paris? Answer in JSON.",
                            text={"format": {"type": "json_object"}})
    assert engine.calls[0][1].structured_outputs.json == schema
    assert engine.calls[1][1].structured_outputs.json_object


def test_forced_call_is_a_grammar(client: openai.OpenAI, engine: ScriptedEngine) -> None:
    client.responses.create(model="tiny", input="Weather in Paris?", tools=[WEATHER],
                            tool_choice={"type": "function", "name": "get_weather"})
    assert 'invoke name=\\"get_weather\\"' in engine.calls[0][1].structured_outputs.structural_tag


def test_errors_are_openai_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="Previous response with id 'resp_missing' not found"):
        client.responses.create(model="tiny", input="Hi", previous_response_id="resp_missing")
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_missing")
    with pytest.raises(openai.BadRequestError, match="'web_search' is not supported") as caught:
        client.responses.create(model="tiny", input="Hi", tools=[{"type": "web_search"}])
    assert caught.value.body["type"] == "BadRequestError"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.responses.create(model="other", input="Hi")
    # A rendering error names the input item it came from.
    with pytest.raises(openai.BadRequestError, match=r"^Error code: 400 - .*input\[0\]"):
        client.responses.create(model="tiny", input=[{"type": "function_call_output", "call_id": "c",
                                                      "output": "x"}])
    response = client.responses.create(model="tiny", input="Hi")
    with pytest.raises(openai.BadRequestError, match="Only responses created with background=true"):
        client.responses.cancel(response.id)


@dataclass
class GatedEngine(ScriptedEngine):
    """Holds every request after its first output until ``gate`` is set, or until it is aborted (then it ends with
    finish_reason "abort", as the engine does); ``ended`` is set when a request's output stream ends, ``completed``
    only if it played its whole script."""

    gate: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)
    aborted: set[str] = field(default_factory=set)
    completed: bool = False

    async def generate(self, prompt_token_ids: list[int], sampling_params: Any, request_id: str,
                       **kwargs: Any) -> AsyncIterator[RequestOutput]:
        try:
            async for out in super().generate(prompt_token_ids, sampling_params, request_id, **kwargs):
                yield out
                while not self.gate.is_set():
                    if request_id in self.aborted:
                        yield RequestOutput(request_id, None, [], [CompletionOutput(
                            index=0, text="", token_ids=[], finish_reason="abort")], finished=True)
                        return
                    await asyncio.sleep(0.001)
            self.completed = True
        finally:
            self.ended.set()

    async def abort(self, request_id: str) -> None:
        self.aborted.add(request_id)


def test_deleting_a_background_response_stops_it(tokenizer: Tokenizer) -> None:
    engine = GatedEngine(tokenizer, ["a", "b", "c"])
    for client in sdk(engine):
        started = client.responses.create(model="tiny", input="Hi", background=True)
        assert client.responses.retrieve(started.id).status == "in_progress"
        client.responses.delete(started.id)
        assert engine.ended.wait(timeout=30), "the background run was not stopped"
        assert not engine.completed
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(started.id)


def test_cancel_stops_a_background_response(tokenizer: Tokenizer) -> None:
    engine = GatedEngine(tokenizer, ["a", "b", "c"])
    for client in sdk(engine):
        started = client.responses.create(model="tiny", input="Hi", background=True)
        cancelled = client.responses.cancel(started.id)
        assert cancelled.status == "cancelled" and cancelled.output_text == "a"
        assert client.responses.retrieve(started.id).status == "cancelled" and not engine.completed


def test_empty_input_is_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="input must not be empty"):
        client.responses.create(model="tiny", input=[])


def test_store_false_is_not_kept_and_delete_forgets(client: openai.OpenAI) -> None:
    unstored = client.responses.create(model="tiny", input="Hi", store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    stored = client.responses.create(model="tiny", input="Hi")
    assert client.responses.retrieve(stored.id).id == stored.id
    client.responses.delete(stored.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(stored.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(stored.id)


def test_the_store_drops_the_oldest_first(engine: ScriptedEngine) -> None:
    for client in sdk(engine, ServerConfig(max_stored_responses=2)):
        ids = [client.responses.create(model="tiny", input="Hi").id for _ in range(3)]
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(ids[0])
        assert [client.responses.retrieve(i).id for i in ids[1:]] == ids[1:]
    for client in sdk(engine, ServerConfig(max_stored_responses=0)):
        with pytest.raises(openai.BadRequestError, match="max-stored-responses 0"):
            client.responses.create(model="tiny", input="Hi", background=True)


def test_background_response_is_polled(client: openai.OpenAI) -> None:
    started = client.responses.create(model="tiny", input="Weather in Paris?", tools=[WEATHER], background=True)
    assert started.status == "in_progress" and started.background and started.output == []
    deadline = time.monotonic() + 30
    while (polled := client.responses.retrieve(started.id)).status == "in_progress":
        assert time.monotonic() < deadline, "the background response never finished"
        time.sleep(0.01)
    assert polled.status == "completed" and polled.output[-1].type == "function_call"
    with pytest.raises(openai.BadRequestError, match="already finished"):
        client.responses.cancel(started.id)
