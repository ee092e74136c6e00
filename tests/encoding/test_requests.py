"""prepare_chat_request: OpenAI request fields -> encoder input, prompt and parser settings."""

import json
from pathlib import Path

import pytest

from dsv32.encoding import encode_messages, prepare_chat_request, resolve_thinking
from dsv32.encoding.encode import render_tool_calls, render_tools
from dsv32.encoding.parse import merge_deltas

DATA = Path(__file__).resolve().parents[1] / "data" / "encoding"
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}
TIME = {"type": "function", "function": {"name": "get_time", "description": None, "parameters": {"type": "object"}}}
USER = [{"role": "user", "content": "hi"}]
DSML_CALL = (
    '\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name="get_time">\n\n</｜DSML｜invoke>\n</｜DSML｜function_calls>'
)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, False),
        ({"chat_template_kwargs": {"thinking": True}}, True),
        ({"chat_template_kwargs": {"enable_thinking": True}}, True),
        ({"chat_template_kwargs": {"thinking": False, "enable_thinking": True}}, True),  # vLLM: thinking or enable
        ({"chat_template_kwargs": {"thinking": False}, "reasoning_effort": "high"}, False),
        ({"thinking": {"type": "enabled"}}, True),
        ({"thinking": {"type": "disabled"}, "reasoning_effort": "high"}, False),
        ({"thinking": True}, True),
        ({"reasoning": {"enabled": True}}, True),
        ({"reasoning_effort": "none"}, False),
        ({"reasoning_effort": "low"}, True),
        ({"chat_template_kwargs": {"reasoning_effort": "max"}}, True),
    ],
)
def test_thinking_switches(kwargs: dict, expected: bool) -> None:
    # sglang#15294 / #17057: users pass enable_thinking or DeepSeek's {"thinking": {"type": ...}}; all must work.
    assert resolve_thinking(**kwargs) is expected
    encoding = prepare_chat_request(USER, **kwargs)
    assert encoding.thinking_mode == ("thinking" if expected else "chat")
    assert encoding.prompt.endswith("<think>" if expected else "</think>")
    assert encoding.parser_thinking_mode == encoding.thinking_mode


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"chat_template_kwargs": {"thinking": "false"}}, "chat_template_kwargs.thinking must be true or false"),
        ({"thinking": {"type": "on"}}, "thinking.type must be"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort must be one of"),
        ({"reasoning": {"enabled": 1}}, "reasoning.enabled must be true or false"),
    ],
)
def test_bad_thinking_switches_are_refused(kwargs: dict, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        prepare_chat_request(USER, **kwargs)


def test_official_fixture_through_the_request_path() -> None:
    # The fixture's conversation ends with the final answer; a request is everything before it.
    data = json.loads((DATA / "test_input.json").read_text(encoding="utf-8"))
    request = data["messages"][:-1]
    encoding = prepare_chat_request(request, tools=data["tools"], chat_template_kwargs={"thinking": True})
    assert (DATA / "test_output.txt").read_text(encoding="utf-8").startswith(encoding.prompt)
    assert encoding.prompt.endswith("</function_results>\n\n<think>")
    assert encoding.parser_thinking_mode == "thinking"
    assert encoding.tool_choice == "auto" and [t["function"]["name"] for t in encoding.tools] == [
        "get_datetime",
        "get_weather",
    ]


def test_tools_join_an_existing_system_message() -> None:
    encoding = prepare_chat_request([{"role": "system", "content": "Be brief."}, *USER], tools=[WEATHER])
    assert encoding.prompt.startswith(f"{BOS}Be brief.\n\n## Tools\n\n")
    assert len(encoding.messages) == 2


def test_tools_get_an_empty_system_message_when_there_is_none() -> None:
    encoding = prepare_chat_request(USER, tools=[WEATHER, TIME])
    time_without_none = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    rendered = render_tools([WEATHER, time_without_none])  # None-valued keys ("description": null) are dropped
    assert encoding.prompt == f"{BOS}\n\n{rendered}<｜User｜>hi<｜Assistant｜></think>"


def test_tool_choice_none_renders_no_tools_and_calls_stay_text() -> None:
    # sglang#35736: tools rendered under tool_choice "none" made the model call them and leak DSML.
    encoding = prepare_chat_request(USER, tools=[WEATHER], tool_choice="none")
    assert "## Tools" not in encoding.prompt and encoding.tools == [] and encoding.tool_choice == "none"
    parser = encoding.new_parser()
    message = merge_deltas(parser.feed(DSML_CALL) + parser.finish())
    assert message["tool_calls"] == [] and not parser.tools_called


def test_named_tool_choice_renders_and_accepts_only_that_tool() -> None:
    choice = {"type": "function", "function": {"name": "get_time"}}
    encoding = prepare_chat_request(USER, tools=[WEATHER, TIME], tool_choice=choice)
    assert '"name": "get_time"' in encoding.prompt and '"name": "get_weather"' not in encoding.prompt
    assert encoding.tool_choice == choice
    parser = encoding.new_parser()
    weather = DSML_CALL.replace("get_time", "get_weather")
    assert merge_deltas(parser.feed(weather) + parser.finish())["tool_calls"] == []
    parser = encoding.new_parser()
    assert merge_deltas(parser.feed(DSML_CALL) + parser.finish())["tool_calls"][0]["function"]["name"] == "get_time"


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"tool_choice": "required"}, "tool_choice 'required' needs a non-empty tools list"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}}, "not in tools"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice must be"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, r"tools\[0\] must be"),
        ({"tools": [{"type": "retrieval", "function": {"name": "x"}}]}, r"tools\[0\] must be"),
    ],
)
def test_bad_tool_fields_are_refused(kwargs: dict, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        prepare_chat_request(USER, **kwargs)


@pytest.mark.parametrize(
    ("response_format", "rendered"),
    [
        ({"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "array"}}}, '{"type": "array"}'),
        ({"type": "json_object"}, '{"type": "object"}'),
        ({"type": "text"}, None),
        ({"type": "structural_tag", "format": {"type": "const_string", "value": "x"}}, None),
    ],
)
def test_response_format_goes_into_the_system_message(response_format: dict, rendered: str | None) -> None:
    prompt = prepare_chat_request(USER, response_format=response_format).prompt
    if rendered is None:
        assert prompt == f"{BOS}<｜User｜>hi<｜Assistant｜></think>"
    else:
        assert prompt == (
            f"{BOS}\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
            f"{rendered}<｜User｜>hi<｜Assistant｜></think>"
        )


@pytest.mark.parametrize(
    ("response_format", "error"),
    [
        ({"type": "json_schema", "json_schema": {"name": "n"}}, "json_schema.schema must be"),
        ({"type": "json"}, "response_format.type must be"),
    ],
)
def test_bad_response_format_is_refused(response_format: dict, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        prepare_chat_request(USER, response_format=response_format)


def test_request_messages_are_normalized_like_the_servers_do() -> None:
    # vllm PR #30025: rendering must use the parsed conversation (content parts, dict arguments, aliases), not the
    # raw request objects.
    request = [
        {"role": "system", "content": None},
        {"role": "user", "content": [{"type": "text", "text": "Weather"}, {"type": "text", "text": "in Paris?"}]},
        {
            "role": "assistant",
            "content": None,
            "reasoning": "Need the tool.",  # vLLM's alias of reasoning_content
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "21C"}], "name": "get_weather"},
    ]
    clean = [
        {"role": "system", "content": ""},
        {"role": "user", "content": "Weather\nin Paris?"},
        {
            "role": "assistant",
            "reasoning_content": "Need the tool.",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
        },
        {"role": "tool", "content": "21C"},
    ]
    encoding = prepare_chat_request(request, chat_template_kwargs={"thinking": True})
    assert encoding.prompt == encode_messages(clean, "thinking")
    assert "<think>Need the tool.</think>" in encoding.prompt
    assert encoding.parser_thinking_mode == "thinking"


def test_developer_history_before_the_last_user_turn_is_accepted() -> None:
    messages = [{"role": "developer", "content": "d"}, {"role": "assistant", "content": "a"}, *USER]
    encoding = prepare_chat_request(messages, chat_template_kwargs={"thinking": True})
    assert encoding.prompt == encode_messages(messages, "thinking", drop_thinking=False)


def test_continue_final_message() -> None:
    thinking = {"chat_template_kwargs": {"thinking": True}}
    unfinished = {"role": "assistant", "reasoning_content": "Let me", "content": ""}
    encoding = prepare_chat_request([*USER, unfinished], continue_final_message=True, **thinking)
    assert encoding.prompt.endswith("<｜Assistant｜><think>Let me") and encoding.parser_thinking_mode == "thinking"
    answered = {"role": "assistant", "reasoning_content": "ok", "content": "The answer"}
    encoding = prepare_chat_request([*USER, answered], continue_final_message=True, **thinking)
    assert encoding.prompt.endswith("<think>ok</think>The answer") and encoding.parser_thinking_mode == "chat"
    encoding = prepare_chat_request([*USER, answered], continue_final_message=True)
    assert encoding.prompt.endswith("<｜Assistant｜></think>The answer") and encoding.parser_thinking_mode == "chat"


@pytest.mark.parametrize(
    ("messages", "kwargs", "error"),
    [
        ([], {}, "messages must be a non-empty list"),
        ([*USER, {"role": "assistant", "content": "a"}], {}, r"messages\[1\]: the conversation must end with a user"),
        ([{"role": "system", "content": "s"}], {}, r"messages\[0\]: the conversation must end"),
        (USER, {"continue_final_message": True}, r"messages\[0\]: continue_final_message needs a final assistant"),
        (
            [*USER, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}],
            {"continue_final_message": True},
            "cannot continue an assistant message that has tool_calls",
        ),
        ([{"role": "user", "content": [{"type": "image_url"}]}], {}, r"messages\[0\].content\[0\] must be"),
        ([{"role": "bot", "content": "x"}], {}, r"messages\[0\].role must be one of"),
        (["hi"], {}, r"messages\[0\] must be an object"),
        # the index names the request's message even though an empty system message was put in front for the tools
        ([*USER, {"role": "tool", "content": "r"}], {"tools": [WEATHER]}, r"messages\[1\]: a tool result must follow"),
        (
            [{"role": "system", "content": "s", "tools": [WEATHER]}, *USER],
            {"tools": [WEATHER]},
            "tools given both in the request and on messages",
        ),
    ],
)
def test_invalid_requests_raise_value_error_naming_the_message(messages: list, kwargs: dict, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        prepare_chat_request(messages, **kwargs)


def test_tool_results_turn_resumes_reasoning_and_parses_the_answer() -> None:
    # sglang#17551: after tool results the completion starts inside reasoning; its answer must reach content.
    call = {"type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    messages = [*USER, {"role": "assistant", "tool_calls": [call]}, {"role": "tool", "content": "noon"}]
    encoding = prepare_chat_request(messages, tools=[TIME], chat_template_kwargs={"thinking": True})
    assert encoding.parser_thinking_mode == "thinking"
    parser = encoding.new_parser()
    message = merge_deltas(parser.feed("It is noon.</think>It's noon." + EOS) + parser.finish())
    assert message["reasoning_content"] == "It is noon." and message["content"] == "It's noon."


# ---- the tool-call grammar ---------------------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}, "opts": {
        "type": "object", "properties": {"metric": {"type": "boolean"}}}}, "required": ["city"]}}}
NO_ARGS = {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}}


def _matches(tag: str, text: str) -> bool:
    """Whether ``text`` is a complete sentence of the structural tag's grammar (xgrammar, no tokenizer needed)."""
    import xgrammar

    compiler = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo([chr(c) for c in range(32, 127)]))
    matcher = xgrammar.GrammarMatcher(compiler.compile_structural_tag(tag))
    return matcher.accept_string(text) and matcher.is_completed()


def test_the_tool_call_grammar_accepts_exactly_the_encoders_dsml() -> None:
    """The encoder's rendering of calls (what the model was trained on and the parser reads) is in the grammar's
    language, byte for byte, empty arguments included; other tools, bad arguments and a second call with
    parallel_tool_calls=false are not."""
    weather = {"name": "get_weather", "arguments": {"city": 'Paris "FR"', "days": 2, "opts": {"metric": True}}}
    ping = {"name": "ping", "arguments": {}}
    encoding = prepare_chat_request(USER, tools=[WEATHER, NO_ARGS], tool_choice="required")
    tag = encoding.tool_call_structural_tag()
    assert _matches(tag, render_tool_calls([weather, ping]))
    assert _matches(tag, render_tool_calls([ping]))
    assert not _matches(tag, "plain text")
    assert not _matches(tag, render_tool_calls([{"name": "get_weather", "arguments": {"days": 2}}]))  # no city
    single = encoding.tool_call_structural_tag(parallel_tool_calls=False)
    assert _matches(single, render_tool_calls([weather])) and not _matches(single, render_tool_calls([weather, ping]))
    named = prepare_chat_request(USER, tools=[WEATHER, NO_ARGS],
                                 tool_choice={"type": "function", "function": {"name": "ping"}})
    assert _matches(named.tool_call_structural_tag(), render_tool_calls([ping]))
    assert not _matches(named.tool_call_structural_tag(), render_tool_calls([weather]))


def test_tool_call_grammar_only_when_a_call_is_forced_or_a_tool_is_strict() -> None:
    assert prepare_chat_request(USER, tools=[WEATHER]).tool_call_structural_tag() is None
    assert prepare_chat_request(USER, tools=[WEATHER], tool_choice="none").tool_call_structural_tag() is None
    strict = {"type": "function", "function": {**WEATHER["function"], "strict": True}}
    tag = prepare_chat_request(USER, tools=[strict, NO_ARGS]).tool_call_structural_tag()
    assert _matches(tag, "Just text.")  # "auto": the answer may be text
    assert _matches(tag, "Sure." + render_tool_calls([{"name": "get_weather", "arguments": {"city": "Rome"}}]))
    assert not _matches(tag, "Sure." + render_tool_calls([{"name": "get_weather", "arguments": {"days": 1}}]))
