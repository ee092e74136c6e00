"""Request validation and response serialization of the OpenAI wire models (no server needed)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from dsv32.server.protocol import (
    ChatCompletionRequest,
    ChatResponseMessage,
    CompletionRequest,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    TokenizeRequest,
    ToolCall,
)

USER = [{"role": "user", "content": "hi"}]
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def chat(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": USER, **fields})


def test_minimal_chat_request_takes_vllm_defaults() -> None:
    request = chat()
    assert request.n == 1 and request.stream is False and request.temperature is None
    assert request.effective_tool_choice() == "none"
    assert request.requested_max_tokens() is None


def test_unknown_fields_are_accepted_and_reported_as_extra() -> None:
    request = chat(best_of=1, some_future_field={"x": 1})
    assert set(request.model_extra) == {"best_of", "some_future_field"}


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert chat(max_tokens=5, max_completion_tokens=9).requested_max_tokens() == 9


def test_tools_default_tool_choice_to_auto() -> None:
    assert chat(tools=[WEATHER_TOOL]).effective_tool_choice() == "auto"


@pytest.mark.parametrize(("fields", "match"), [
    ({"stream_options": {"include_usage": True}}, "only be defined when `stream=True`"),
    ({"top_logprobs": 2}, "`logprobs` must be set to true"),
    ({"logprobs": True, "top_logprobs": -1}, "non-negative"),
    ({"tools": []}, "must not be an empty list"),
    ({"tool_choice": "required"}, "`tools` must be set"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": [WEATHER_TOOL]},
     "'nope' has not been passed"),
    ({"continue_final_message": True}, "Cannot set both"),
    ({"continue_final_message": True, "add_generation_prompt": False}, "last message to be an assistant"),
    ({"response_format": {"type": "json_schema"}}, "json_schema is required"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"seed": 2**64}, "seed"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "'image_url' is not supported"),
    ({"messages": [{"role": "user", "content": [{"type": [None, None], "text": ""}]}]}, "is not supported"),
    ({"messages": [{"role": "user", "content": [{"type": {}, "text": ""}]}]}, "is not supported"),
])
def test_invalid_chat_requests_are_refused(fields: dict, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        ChatCompletionRequest.model_validate({"messages": USER, **fields})


@pytest.mark.parametrize(("function", "match"), [
    ({"name": "bad name!"}, "invalid function name"),
    ({"name": "f", "parameters": ["not", "a", "schema"]}, "parameters"),
    ({"name": "f", "parameters": {"type": "map"}}, "not a JSON Schema type"),
    ({"name": "f", "parameters": {"type": "object", "properties": ["city"]}}, "properties must be an object"),
    ({"name": "f", "parameters": {"type": "object", "properties": {"c": {"type": "strin"}}}},
     r"parameters.properties.c.type"),
    ({"name": "f", "parameters": {"type": "object", "required": "city"}}, "required must be a list"),
])
def test_bad_tool_schemas_are_refused(function: dict, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        chat(tools=[{"type": "function", "function": function}])


def test_text_content_parts_are_joined() -> None:
    request = chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text",
                                                                                         "text": "b"}]}])
    assert request.messages[0].text() == "a\nb"


@pytest.mark.parametrize(("prompt", "expected"), [
    ("hello", ["hello"]),
    (["a", "b"], ["a", "b"]),
    ([1, 2, 3], [[1, 2, 3]]),
    ([[1, 2], [3]], [[1, 2], [3]]),
])
def test_completion_prompt_shapes(prompt: object, expected: list) -> None:
    assert CompletionRequest(prompt=prompt).prompts() == expected


@pytest.mark.parametrize(("fields", "match"), [
    ({"prompt": []}, "Prompt cannot be empty"),
    ({"prompt": [[1], []]}, "Prompt cannot be empty"),
    ({"prompt": "x", "suffix": "y"}, "suffix is not currently supported"),
    ({"prompt": "x", "max_tokens": 0}, "only allowed together with echo"),
    ({"prompt": "x", "max_tokens": -1}, "at least 0"),
    ({"prompt": "x", "logprobs": -2}, "non-negative"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "stream_options": {}}, "stream=True"),
    ({"prompt": {"text": "x"}}, "prompt"),
])
def test_invalid_completion_requests_are_refused(fields: dict, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        CompletionRequest.model_validate(fields)


def test_completion_defaults_follow_vllm() -> None:
    request = CompletionRequest(prompt="x")
    assert request.max_tokens == 16 and request.add_special_tokens is True and request.echo is False
    assert CompletionRequest(prompt="x", max_tokens=0, echo=True).max_tokens == 0


def test_tokenize_needs_exactly_one_input() -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        TokenizeRequest()
    with pytest.raises(ValidationError, match="exactly one"):
        TokenizeRequest(prompt="x", messages=USER)


def test_response_message_drops_empty_tool_calls_and_carries_both_reasoning_keys() -> None:
    message = ChatResponseMessage(content="4", reasoning="2+2", reasoning_content="2+2", tool_calls=[])
    assert message.model_dump() == {"role": "assistant", "content": "4", "reasoning": "2+2",
                                    "reasoning_content": "2+2"}
    with_call = ChatResponseMessage(tool_calls=[ToolCall(id="call_1", function=FunctionCall(name="f",
                                                                                           arguments="{}"))])
    assert with_call.model_dump()["tool_calls"][0] == {"id": "call_1", "type": "function",
                                                       "function": {"name": "f", "arguments": "{}"}}
    assert with_call.model_dump()["content"] is None


def test_delta_sends_only_the_fields_it_sets() -> None:
    assert json.loads(DeltaMessage(role="assistant", content="").model_dump_json()) == {"role": "assistant",
                                                                                      "content": ""}
    header = DeltaMessage(tool_calls=[DeltaToolCall(index=0, id="call_1", type="function",
                                                    function=DeltaFunctionCall(name="f", arguments=""))])
    fragment = DeltaMessage(tool_calls=[DeltaToolCall(index=0, function=DeltaFunctionCall(arguments='{"a'))])
    assert json.loads(header.model_dump_json()) == {"tool_calls": [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}]}
    assert json.loads(fragment.model_dump_json()) == {"tool_calls": [{"index": 0, "function": {"arguments": '{"a'}}]}
    assert DeltaMessage().is_empty() and not DeltaMessage(content="x").is_empty()
