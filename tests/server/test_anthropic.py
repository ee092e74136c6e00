"""Anthropic's Messages API without an engine: the request as the chat request it becomes (and the prompt that
renders), the chat parser's output as Anthropic's content-block events in any split, the stop reasons, the error
envelope and the request checks. The API against a real server, through the official SDK, is test_anthropic_api.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from dsv32.encoding import Delta, ToolCallDelta
from dsv32.encoding.encode import EOS_TOKEN
from dsv32.server.anthropic import (
    ContentBlocks,
    anthropic_error,
    fold_blocks,
    stop_reason,
    to_chat_request,
)
from dsv32.server.anthropic_protocol import AnthropicCountTokensRequest, AnthropicMessagesRequest
from dsv32.server.chat import in_client_terms, render_chat_prompt
from dsv32.server.errors import APIError
from tests.server.test_chat_parsing import CALL, USER

WEATHER = {"name": "get_weather", "description": "Weather of a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}


def messages_request(**fields: object) -> AnthropicMessagesRequest:
    return AnthropicMessagesRequest.model_validate({"model": "tiny", "max_tokens": 64, "messages": USER, **fields})


def run(request: AnthropicMessagesRequest, text: str, chunk: int) -> tuple[list[dict], list[dict], object]:
    """Render ``request``, feed ``text`` as the completion in ``chunk``-character pieces: (events, content, parser)."""
    chat, _ = to_chat_request(request)
    rendered = render_chat_prompt(chat)
    parser = rendered.new_parser()
    blocks = ContentBlocks(include_text=not rendered.forces_tool_call)
    events: list[dict] = []
    pieces = [text[i:i + chunk] for i in range(0, len(text), chunk)]
    for step, piece in enumerate(pieces):
        events += blocks.feed(parser.feed(piece) + (parser.finish() if step == len(pieces) - 1 else []))
    events += blocks.close()
    return events, fold_blocks(events), parser


def check_event_order(events: list[dict]) -> None:
    """Every block is started, gets its deltas, and is stopped before the next one starts, indexed from 0."""
    open_index = None
    next_index = 0
    for event in events:
        if event["type"] == "content_block_start":
            assert open_index is None and event["index"] == next_index
            open_index, next_index = event["index"], next_index + 1
        elif event["type"] == "content_block_delta":
            assert event["index"] == open_index
        else:
            assert event["type"] == "content_block_stop" and event["index"] == open_index
            open_index = None
    assert open_index is None


# ---------------------------------------------------------------------------------------------------- request


def test_conversation_with_a_tool_round_trip_becomes_chat_messages() -> None:
    request = messages_request(
        system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Use tools."}],
        tools=[WEATHER],
        messages=[*USER,
                  {"role": "assistant", "content": [
                      {"type": "thinking", "thinking": "I need the weather.", "signature": "sig"},
                      {"type": "text", "text": "Looking."},
                      {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
                  {"role": "user", "content": [
                      {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "sun"}]},
                      {"type": "text", "text": "And tomorrow?"}]}])
    chat, origins = to_chat_request(request)
    assert [m.role for m in chat.messages] == ["system", "user", "assistant", "tool", "user"]
    assert origins == ["system", "messages[0]", "messages[1]", "messages[2]", "messages[2]"]
    assert chat.messages[0].content == "Be brief.\nUse tools."
    assistant = chat.messages[2]
    assert assistant.content == "Looking." and assistant.reasoning_content == "I need the weather."
    assert assistant.tool_calls[0].function.name == "get_weather"
    assert assistant.tool_calls[0].function.arguments == {"city": "Paris"}
    assert chat.messages[3].tool_call_id == "toolu_1" and chat.messages[3].content == "sun"
    assert chat.max_tokens == 64 and chat.tools[0].function.parameters == WEATHER["input_schema"]
    prompt = render_chat_prompt(chat).prompt
    assert "<function_results>\n<result>sun</result>\n</function_results>" in prompt
    assert prompt.endswith("<｜User｜>And tomorrow?<｜Assistant｜></think>")


@pytest.mark.parametrize(("choice", "expected"), [
    ({"type": "auto"}, "auto"),
    ({"type": "any"}, "required"),
    ({"type": "none"}, "none"),
    ({"type": "tool", "name": "get_weather"}, {"type": "function", "function": {"name": "get_weather"}}),
])
def test_tool_choice_maps_to_the_chat_choice(choice: dict, expected: object) -> None:
    chat, _ = to_chat_request(messages_request(tools=[WEATHER], tool_choice={**choice,
                                                                               "disable_parallel_tool_use": True}))
    got = chat.tool_choice.model_dump() if hasattr(chat.tool_choice, "model_dump") else chat.tool_choice
    assert got == expected and chat.parallel_tool_calls is False


@pytest.mark.parametrize(("thinking", "opens_reasoning"), [
    (None, False), ({"type": "disabled"}, False), ({"type": "enabled", "budget_tokens": 16}, True),
    ({"type": "adaptive"}, True)])
def test_thinking_switches_the_prompt_mode(thinking: dict | None, opens_reasoning: bool) -> None:
    chat, _ = to_chat_request(messages_request(thinking=thinking))
    assert render_chat_prompt(chat).prompt.endswith("<think>" if opens_reasoning else "</think>")


def test_sampling_fields_and_extensions_carry_over() -> None:
    chat, _ = to_chat_request(messages_request(stop_sequences=["END"], temperature=0.5, top_p=0.9, top_k=40, seed=7,
                                               ignore_eos=True, logit_bias={"5": 1.0}))
    assert (chat.stop, chat.temperature, chat.top_p, chat.top_k, chat.seed, chat.ignore_eos, chat.logit_bias) == (
        ["END"], 0.5, 0.9, 40, 7, True, {"5": 1.0})


def test_final_assistant_turn_is_a_prefill() -> None:
    chat, _ = to_chat_request(messages_request(messages=[*USER, {"role": "assistant", "content": "It is"}]))
    assert chat.continue_final_message and not chat.add_generation_prompt
    assert render_chat_prompt(chat).prompt.endswith("</think>It is")


def test_count_tokens_request_renders_the_same_prompt() -> None:
    fields = {"model": "tiny", "messages": USER, "tools": [WEATHER], "system": "Be brief."}
    counted, _ = to_chat_request(AnthropicCountTokensRequest.model_validate(fields))
    sent, _ = to_chat_request(AnthropicMessagesRequest.model_validate({**fields, "max_tokens": 8}))
    assert render_chat_prompt(counted).prompt == render_chat_prompt(sent).prompt


@pytest.mark.parametrize(("fields", "needle"), [
    ({"max_tokens": None}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": 1.5}, "temperature"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "system", "content": "x"}]}, "role"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "'image' is not supported"),
    ({"messages": [{"role": "user", "content": [{"type": [None, None], "text": ""}]}]}, "is not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "f", "input": {}}]}]},
     "cannot be in a user message"),
    ({"messages": [*USER, {"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "a"}]}]},
     "cannot be in a assistant message"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tools"),
    ({"tools": [{**WEATHER, "name": "bad name"}]}, "pattern"),
    ({"tools": [{**WEATHER, "input_schema": {"type": "array"}}]}, "'object'"),
    ({"tools": [WEATHER, WEATHER]}, "unique"),
    ({"tool_choice": {"type": "any"}}, "needs tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "other"}}, "not in tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "tool"}}, "name is required"),
    ({"thinking": {"type": "enabled"}}, "budget_tokens is required"),
    ({"thinking": {"type": "enabled", "budget_tokens": 64}}, "less than max_tokens"),
])
def test_requests_anthropic_refuses_are_refused(fields: dict, needle: str) -> None:
    body = {"model": "tiny", "max_tokens": 64, "messages": USER, **fields}
    body = {key: value for key, value in body.items() if value is not None}
    with pytest.raises(ValidationError, match=needle):
        AnthropicMessagesRequest.model_validate(body)


def test_rendering_errors_name_the_anthropic_message() -> None:
    error = APIError("messages[3]: a tool result must follow an assistant message with tool_calls", 400)
    renamed = in_client_terms(error, ["system", "messages[0]", "messages[1]", "messages[1]"])
    assert renamed.message == "messages[1]: a tool result must follow an assistant message with tool_calls"
    other = APIError("max_tokens is too large", 400)
    assert in_client_terms(other, ["messages[0]"]) is other


# ---------------------------------------------------------------------------------------------------- output


@pytest.mark.parametrize("chunk", [1, 4, 10_000])
def test_thinking_then_text_are_two_blocks(chunk: int) -> None:
    events, content, _ = run(messages_request(thinking={"type": "enabled", "budget_tokens": 8}),
                             "Let me think.</think>It is sunny." + EOS_TOKEN, chunk)
    check_event_order(events)
    assert content == [{"type": "thinking", "thinking": "Let me think.", "signature": ""},
                       {"type": "text", "text": "It is sunny."}]


@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_text_then_tool_call(chunk: int) -> None:
    events, content, parser = run(messages_request(tools=[WEATHER]), "Checking." + CALL, chunk)
    check_event_order(events)
    assert [block["type"] for block in content] == ["text", "tool_use"]
    call = content[1]
    assert call["name"] == "get_weather" and call["id"].startswith("toolu_")
    assert call["input"] == {"city": 'Paris "FR"', "days": 3}
    deltas = [e["delta"] for e in events if e["type"] == "content_block_delta" and e["index"] == 1]
    assert all(d["type"] == "input_json_delta" for d in deltas)
    assert stop_reason(SimpleNamespace(finish_reason="stop", stop_reason=None), parser) == ("tool_use", None)


def test_forced_tool_call_drops_text() -> None:
    _, content, _ = run(messages_request(tools=[WEATHER], tool_choice={"type": "any"}), "stray" + CALL, 3)
    assert [block["type"] for block in content] == ["tool_use"]


def test_text_inside_a_tool_call_follows_its_block() -> None:
    blocks = ContentBlocks()
    events = blocks.feed([Delta(tool_call=ToolCallDelta(0, id="call_1", name="f")),
                          Delta(tool_call=ToolCallDelta(0, arguments='{"a": ')),
                          Delta(content="stray"),
                          Delta(tool_call=ToolCallDelta(0, arguments="1}"))]) + blocks.close()
    check_event_order(events)
    assert fold_blocks(events) == [{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}},
                                   {"type": "text", "text": "stray"}]


def test_omitted_thinking_is_not_returned() -> None:
    blocks = ContentBlocks(include_reasoning=False)
    events = blocks.feed([Delta(reasoning_content="hmm"), Delta(content="answer")]) + blocks.close()
    assert fold_blocks(events) == [{"type": "text", "text": "answer"}]


@pytest.mark.parametrize(("finish", "stop", "expected"), [
    ("length", None, ("max_tokens", None)),
    ("stop", None, ("end_turn", None)),
    ("stop", "END", ("stop_sequence", "END")),
    ("stop", 7, ("end_turn", None)),  # a stop token id is not a stop sequence
])
def test_stop_reasons(finish: str, stop: object, expected: tuple) -> None:
    parser = SimpleNamespace(tools_called=False)
    assert stop_reason(SimpleNamespace(finish_reason=finish, stop_reason=stop), parser) == expected


def test_aborted_request_is_an_overloaded_error() -> None:
    with pytest.raises(APIError) as caught:
        stop_reason(SimpleNamespace(finish_reason="abort", stop_reason=None), SimpleNamespace(tools_called=False))
    assert anthropic_error(caught.value)["error"]["type"] == "overloaded_error"


@pytest.mark.parametrize(("status", "kind"), [
    (400, "invalid_request_error"), (401, "authentication_error"), (403, "permission_error"),
    (404, "not_found_error"), (405, "invalid_request_error"), (408, "timeout_error"), (413, "request_too_large"),
    (429, "rate_limit_error"), (500, "api_error"), (501, "api_error"), (503, "overloaded_error")])
def test_error_envelope(status: int, kind: str) -> None:
    assert anthropic_error(APIError("boom", status)) == {"type": "error", "error": {"type": kind, "message": "boom"}}

