"""The chat layer's use of the V3.2 encoding, without an engine: prompt rendering per request (thinking switches,
tools, constrained tool calls) and completion text -> reasoning / content / tool_calls, streamed and whole.

The tool-call round trip is checked here with DSML completions written as the real model emits them, since the
tiny random model never produces a valid call.
"""

from __future__ import annotations

import json

import pytest

from dsv32.encoding.encode import DSML_TOKEN, EOS_TOKEN
from dsv32.server.chat import _delta_message, render_chat_prompt
from dsv32.server.errors import APIError
from dsv32.server.protocol import ChatCompletionRequest

WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                                 "parameters": {"type": "object", "properties": {
                                                     "city": {"type": "string"}, "days": {"type": "integer"}}}}}
CALL = (f'\n\n<{DSML_TOKEN}function_calls>\n<{DSML_TOKEN}invoke name="get_weather">\n'
        f'<{DSML_TOKEN}parameter name="city" string="true">Paris "FR"</{DSML_TOKEN}parameter>\n'
        f'<{DSML_TOKEN}parameter name="days" string="false">3</{DSML_TOKEN}parameter>\n'
        f'</{DSML_TOKEN}invoke>\n</{DSML_TOKEN}function_calls>{EOS_TOKEN}')
USER = [{"role": "user", "content": "Weather in Paris?"}]


def request(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": USER, **fields})


def parse_streamed(rendered, text: str, chunk: int, separate_reasoning: bool = True):
    """Feed ``text`` in ``chunk``-character pieces; fold the deltas the way the SSE stream does."""
    parser = rendered.new_parser(separate_reasoning)
    reasoning, content, calls = "", "", {}
    pieces = [text[i:i + chunk] for i in range(0, len(text), chunk)]
    for step, piece in enumerate(pieces):
        deltas = parser.feed(piece) + (parser.finish() if step == len(pieces) - 1 else [])
        message = _delta_message(deltas, include_reasoning=True)
        assert message.reasoning == message.reasoning_content
        reasoning += message.reasoning or ""
        content += message.content or ""
        for call in message.tool_calls or []:
            entry = calls.setdefault(call.index, {"id": call.id, "name": call.function.name, "arguments": ""})
            entry["arguments"] += call.function.arguments or ""
    return reasoning, content, list(calls.values()), parser.tools_called


@pytest.mark.parametrize("chunk", [1, 3, 7, 10_000])
def test_tool_call_round_trip_in_chat_mode(chunk: int) -> None:
    rendered = render_chat_prompt(request(tools=[WEATHER_TOOL]))
    assert rendered.prompt.endswith("<｜Assistant｜></think>")
    assert '"name": "get_weather"' in rendered.prompt  # the tool schema is in the system prompt
    reasoning, content, calls, called = parse_streamed(rendered, CALL, chunk)
    assert called and reasoning == "" and content == ""
    assert len(calls) == 1 and calls[0]["name"] == "get_weather"
    assert calls[0]["id"].startswith("call_") and len(calls[0]["id"]) == 5 + 24
    assert json.loads(calls[0]["arguments"]) == {"city": 'Paris "FR"', "days": 3}


@pytest.mark.parametrize("chunk", [1, 5, 10_000])
def test_thinking_then_tool_call(chunk: int) -> None:
    rendered = render_chat_prompt(request(tools=[WEATHER_TOOL], chat_template_kwargs={"thinking": True}))
    assert rendered.prompt.endswith("<｜Assistant｜><think>")
    reasoning, content, calls, called = parse_streamed(rendered, "I should look it up.</think>" + CALL, chunk)
    assert reasoning == "I should look it up." and content == "" and called
    assert json.loads(calls[0]["arguments"])["days"] == 3


@pytest.mark.parametrize("switch", [
    {"chat_template_kwargs": {"thinking": True}},
    {"chat_template_kwargs": {"enable_thinking": True}},
    {"reasoning_effort": "high"},
    {"thinking": {"type": "enabled"}},
    {"reasoning": {"enabled": True}},
])
def test_every_thinking_switch_opens_reasoning(switch: dict) -> None:
    rendered = render_chat_prompt(request(**switch))
    assert rendered.prompt.endswith("<think>")
    reasoning, content, _, _ = parse_streamed(rendered, f"2+2 is 4</think>It is 4.{EOS_TOKEN}", 4)
    assert (reasoning, content) == ("2+2 is 4", "It is 4.")


def test_thinking_is_off_by_default_and_with_effort_none() -> None:
    for fields in ({}, {"reasoning_effort": "none"}, {"chat_template_kwargs": {"thinking": False}}):
        rendered = render_chat_prompt(request(**fields))
        assert rendered.prompt.endswith("</think>")
        assert parse_streamed(rendered, "Just an answer.", 3)[:2] == ("", "Just an answer.")


def test_without_reasoning_separation_thinking_stays_in_content() -> None:
    rendered = render_chat_prompt(request(chat_template_kwargs={"thinking": True}))
    reasoning, content, _, _ = parse_streamed(rendered, "hmm</think>4", 2, separate_reasoning=False)
    assert reasoning == "" and content == "hmm</think>4"


def test_truncated_thinking_is_all_reasoning() -> None:
    rendered = render_chat_prompt(request(chat_template_kwargs={"thinking": True}))
    assert parse_streamed(rendered, "still thinking about", 4)[:2] == ("still thinking about", "")


def test_turn_after_tool_result_starts_in_reasoning_when_thinking() -> None:
    messages = [*USER, {"role": "assistant", "content": "", "reasoning_content": "need data",
                        "tool_calls": [{"id": "call_1", "type": "function",
                                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    rendered = render_chat_prompt(request(messages=messages, tools=[WEATHER_TOOL],
                                          chat_template_kwargs={"thinking": True}))
    assert rendered.prompt.endswith("</function_results>\n\n<think>")
    assert "need data</think>" in rendered.prompt  # reasoning of the current tool loop is kept
    assert parse_streamed(rendered, "It is sunny.</think>Sunny in Paris.", 5)[:2] == ("It is sunny.",
                                                                                     "Sunny in Paris.")


def test_tool_choice_none_renders_no_tools_and_parses_no_calls() -> None:
    rendered = render_chat_prompt(request(tools=[WEATHER_TOOL], tool_choice="none"))
    assert "get_weather" not in rendered.prompt
    _, content, calls, called = parse_streamed(rendered, CALL, 6)
    assert not called and calls == [] and "get_weather" in content


@pytest.mark.parametrize("thinking", [False, True])
def test_named_tool_choice_is_a_grammar_after_the_thinking(thinking: bool) -> None:
    other = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    rendered = render_chat_prompt(request(tools=[WEATHER_TOOL, other], chat_template_kwargs={"thinking": thinking},
                                          tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    assert rendered.prompt.endswith("<｜Assistant｜><think>" if thinking else "<｜Assistant｜></think>")
    assert "get_time" not in rendered.prompt  # only the named tool is shown
    tag = rendered.tool_call_structural_tag()
    assert 'invoke name=\\"get_weather\\"' in tag and "get_time" not in tag
    completion = ("I need the weather.</think>" if thinking else "") + CALL
    reasoning, content, calls, called = parse_streamed(rendered, completion, 4)
    assert called and content == "" and reasoning == ("I need the weather." if thinking else "")
    assert calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"]) == {"city": 'Paris "FR"',
                                                                                       "days": 3}


def test_required_tool_choice_lets_the_model_pick_the_name() -> None:
    rendered = render_chat_prompt(request(tools=[WEATHER_TOOL], tool_choice="required"))
    assert rendered.prompt.endswith("<｜Assistant｜></think>")
    assert rendered.tool_call_structural_tag() is not None
    _, content, calls, called = parse_streamed(rendered, CALL, 3)
    assert called and content == "" and calls[0]["name"] == "get_weather"


def test_continue_final_message_continues_the_assistant_text() -> None:
    messages = [*USER, {"role": "assistant", "content": "The weather in Paris is"}]
    rendered = render_chat_prompt(request(messages=messages, continue_final_message=True,
                                          add_generation_prompt=False))
    assert rendered.prompt.endswith("</think>The weather in Paris is")
    assert parse_streamed(rendered, " sunny.", 2)[1] == " sunny."


@pytest.mark.parametrize(("messages", "match"), [
    ([{"role": "assistant", "content": "x"}], "must end with a user"),
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "r"}], "tool"),
])
def test_bad_conversations_are_400(messages: list, match: str) -> None:
    with pytest.raises(APIError, match=match) as caught:
        render_chat_prompt(request(messages=messages))
    assert caught.value.status_code == 400


def test_thinking_switch_must_be_a_boolean() -> None:
    with pytest.raises(APIError, match="true or false"):
        render_chat_prompt(request(chat_template_kwargs={"thinking": "false"}))
