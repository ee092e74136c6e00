"""encode_messages: the official fixture byte-exact, one case per rendering rule of spec/encoding.md, and the
ValueErrors that replace the reference encoder's asserts."""

import copy
import json
from pathlib import Path

import pytest

from dsv32.encoding import EncodingError, encode_messages, parse_message_from_completion_text
from dsv32.encoding.encode import render_tools

DATA = Path(__file__).resolve().parents[1] / "data" / "encoding"

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"

WEATHER_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'},
}
WEATHER_DSML = (
    "\n\n<｜DSML｜function_calls>\n"
    '<｜DSML｜invoke name="get_weather">\n'
    '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="days" string="false">2</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n"
    "</｜DSML｜function_calls>"
)
TOOL_LOOP = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "reasoning_content": "Need the tool.", "tool_calls": [WEATHER_CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def without_ids(message: dict) -> dict:
    message = copy.deepcopy(message)
    for call in message.get("tool_calls") or []:
        call.pop("id", None)
    return message


@pytest.fixture(scope="module")
def official() -> dict:
    data = json.loads((DATA / "test_input.json").read_text(encoding="utf-8"))
    data["messages"][0]["tools"] = data["tools"]
    return data


def test_official_fixture_is_reproduced_byte_exactly(official: dict) -> None:
    expected = (DATA / "test_output.txt").read_text(encoding="utf-8")
    prompt = encode_messages(official["messages"], thinking_mode="thinking", drop_thinking=True)
    assert prompt.strip() == expected.strip()
    assert prompt.startswith(BOS)


def test_official_round_trip_of_a_tool_call_turn(official: dict) -> None:
    # The official test: re-encode messages[4] after context=messages[:4], parse, get it back (content popped).
    messages = official["messages"]
    text = encode_messages(messages[4:5], thinking_mode="thinking", context=messages[:4])
    parsed = parse_message_from_completion_text(text, thinking_mode="thinking")
    expected = without_ids(messages[4])
    parsed = without_ids(parsed)
    parsed.pop("content")
    assert parsed == expected


def test_official_round_trip_of_a_final_answer(official: dict) -> None:
    messages = official["messages"]
    text = encode_messages(messages[-6:-5], thinking_mode="thinking", context=messages[:-6])
    parsed = parse_message_from_completion_text(text, thinking_mode="thinking")
    parsed.pop("tool_calls")
    assert parsed == messages[-6]


@pytest.mark.parametrize(
    ("mode", "ending"),
    [("chat", "</think>"), ("thinking", "<think>")],
)
def test_system_and_user_end_with_the_mode_marker(mode: str, ending: str) -> None:
    messages = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "hi"}]
    assert encode_messages(messages, mode) == f"{BOS}You are a helpful assistant.<｜User｜>hi<｜Assistant｜>{ending}"


def test_tool_loop_in_thinking_mode_keeps_reasoning_and_reopens_thinking() -> None:
    expected = (
        f"{BOS}<｜User｜>Weather in Paris?<｜Assistant｜><think>Need the tool.</think>{WEATHER_DSML}{EOS}"
        '\n\n<function_results>\n<result>{"temp": 21}</result>\n</function_results>\n\n<think>'
    )
    assert encode_messages(TOOL_LOOP, "thinking") == expected


def test_tool_loop_in_chat_mode_drops_reasoning() -> None:
    expected = (
        f"{BOS}<｜User｜>Weather in Paris?<｜Assistant｜></think>{WEATHER_DSML}{EOS}"
        '\n\n<function_results>\n<result>{"temp": 21}</result>\n</function_results>\n\n</think>'
    )
    assert encode_messages(TOOL_LOOP, "chat") == expected


def test_new_user_turn_drops_the_old_turns_reasoning() -> None:
    messages = [
        *TOOL_LOOP,
        {"role": "assistant", "reasoning_content": "Got it.", "content": "It is 21C."},
        {"role": "user", "content": "Thanks"},
    ]
    expected = (
        f"{BOS}<｜User｜>Weather in Paris?<｜Assistant｜></think>{WEATHER_DSML}{EOS}"
        '\n\n<function_results>\n<result>{"temp": 21}</result>\n</function_results>\n\n</think>'
        f"It is 21C.{EOS}<｜User｜>Thanks<｜Assistant｜><think>"
    )
    assert encode_messages(messages, "thinking") == expected
    # reasoning before the last user turn is never rendered, so drop_thinking does not change the prompt
    assert encode_messages(messages, "thinking", drop_thinking=False) == expected


def test_parallel_tool_calls_and_grouped_results() -> None:
    second = {"type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "u"},
        {"role": "assistant", "tool_calls": [WEATHER_CALL, second]},
        {"role": "tool", "content": "r1"},
        {"role": "tool", "content": "r2"},
    ]
    prompt = encode_messages(messages, "chat")
    assert prompt.endswith(
        '</｜DSML｜invoke>\n<｜DSML｜invoke name="get_time">\n\n</｜DSML｜invoke>\n</｜DSML｜function_calls>'
        f"{EOS}\n\n<function_results>\n<result>r1</result>\n<result>r2</result>\n</function_results>\n\n</think>"
    )


def test_non_string_arguments_are_json_and_strings_are_raw() -> None:
    arguments = {"s": 'a "quoted" <tag>\nline', "n": 1.5, "b": True, "z": None, "l": [1, "x"], "o": {"k": "é"}}
    call = {"type": "function", "function": {"name": "f", "arguments": json.dumps(arguments)}}
    prompt = encode_messages([{"role": "user", "content": "u"}, {"role": "assistant", "tool_calls": [call]}], "chat")
    assert '<｜DSML｜parameter name="s" string="true">a "quoted" <tag>\nline</｜DSML｜parameter>' in prompt
    assert '<｜DSML｜parameter name="n" string="false">1.5</｜DSML｜parameter>' in prompt
    assert '<｜DSML｜parameter name="b" string="false">true</｜DSML｜parameter>' in prompt
    assert '<｜DSML｜parameter name="z" string="false">null</｜DSML｜parameter>' in prompt
    assert '<｜DSML｜parameter name="l" string="false">[1, "x"]</｜DSML｜parameter>' in prompt
    assert '<｜DSML｜parameter name="o" string="false">{"k": "é"}</｜DSML｜parameter>' in prompt


def test_dict_arguments_render_like_their_json_string() -> None:
    as_dict = {"type": "function", "function": {"name": "f", "arguments": {"a": 1}}}
    as_text = {"type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    history = [{"role": "user", "content": "u"}]
    assert encode_messages([*history, {"role": "assistant", "tool_calls": [as_dict]}], "chat") == encode_messages(
        [*history, {"role": "assistant", "tool_calls": [as_text]}], "chat"
    )


def test_system_with_response_format() -> None:
    messages = [
        {"role": "system", "content": "S", "response_format": {"type": "json_object"}},
        {"role": "user", "content": "u"},
    ]
    assert encode_messages(messages, "chat") == (
        f"{BOS}S\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
        '{"type": "json_object"}<｜User｜>u<｜Assistant｜></think>'
    )


def test_system_with_tools_renders_the_tools_template() -> None:
    messages = [{"role": "system", "content": "S", "tools": TOOLS}, {"role": "user", "content": "u"}]
    prompt = encode_messages(messages, "chat")
    assert prompt == f"{BOS}S\n\n{render_tools(TOOLS)}<｜User｜>u<｜Assistant｜></think>"
    assert render_tools(TOOLS).startswith("## Tools\n\nYou have access to a set of tools")
    assert render_tools(TOOLS).endswith(f"<functions>\n{json.dumps(TOOLS[0]['function'])}\n</functions>\n")


@pytest.mark.parametrize(("mode", "ending"), [("chat", "</think>"), ("thinking", "<think>")])
def test_developer_message_is_a_user_turn_with_tools_and_format(mode: str, ending: str) -> None:
    messages = [{"role": "developer", "content": "find it", "tools": TOOLS, "response_format": {"type": "x"}}]
    assert encode_messages(messages, mode) == (
        f"{BOS}<｜User｜>\n\n{render_tools(TOOLS)}\n\n## Response Format:\n\nYou MUST strictly adhere to the following "
        f'schema to reply:\n{{"type": "x"}}\n\n# The user\'s message is: find it<｜Assistant｜>{ending}'
    )


def test_tool_results_after_a_developer_turn_reopen_thinking() -> None:
    messages = [
        {"role": "developer", "content": "search", "tools": TOOLS},
        {"role": "assistant", "reasoning_content": "look", "tool_calls": [WEATHER_CALL]},
        {"role": "tool", "content": "found"},
    ]
    assert encode_messages(messages, "thinking").endswith("<think>look</think>" + WEATHER_DSML + EOS + (
        "\n\n<function_results>\n<result>found</result>\n</function_results>\n\n<think>"
    ))


def test_context_is_not_rendered_and_suppresses_bos() -> None:
    full = encode_messages(TOOL_LOOP, "thinking")
    tail = encode_messages(TOOL_LOOP[2:], "thinking", context=TOOL_LOOP[:2])
    assert full.endswith(tail) and not tail.startswith(BOS)
    assert encode_messages(TOOL_LOOP, "thinking", add_default_bos_token=False) == full[len(BOS) :]


def test_none_content_renders_like_the_reference() -> None:
    assert encode_messages([{"role": "user", "content": None}], "chat") == f"{BOS}<｜User｜>None<｜Assistant｜></think>"


def test_developer_before_last_user_needs_drop_thinking_false() -> None:
    messages = [
        {"role": "developer", "content": "d"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "u"},
    ]
    with pytest.raises(ValueError, match="message 0: a developer message before the last user"):
        encode_messages(messages, "thinking")
    assert encode_messages(messages, "thinking", drop_thinking=False) == (
        f"{BOS}<｜User｜>\n\n# The user's message is: d<｜Assistant｜></think>a{EOS}<｜User｜>u<｜Assistant｜><think>"
    )
    # chat mode never drops anything
    assert encode_messages(messages, "chat").endswith("<｜User｜>u<｜Assistant｜></think>")


@pytest.mark.parametrize(
    ("messages", "mode", "error"),
    [
        ([{"role": "function", "content": "x"}], "chat", "message 0: unknown role 'function'"),
        ([{"content": "x"}], "chat", "message 0: unknown role None"),
        (["hello"], "chat", "message 0: must be a dict"),
        ([{"role": "user", "content": "u"}, {"role": "tool", "content": "r"}], "chat", "message 1: a tool result must"),
        ([{"role": "tool", "content": "r"}], "chat", "message 0: a tool result must"),
        (
            [*TOOL_LOOP, {"role": "tool", "content": "extra"}],
            "chat",
            "message 3: tool result #2 after message 1, which made 1 tool call",
        ),
        (
            [{"role": "user", "content": "u"}, {"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}],
            "chat",
            r"message 1: tool_calls\[0\].function.arguments must be a JSON object",
        ),
        (
            [
                {"role": "user", "content": "u"},
                {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]},
            ],
            "chat",
            "must be a JSON object",
        ),
        (
            [
                {"role": "user", "content": "u"},
                {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]},
            ],
            "chat",
            "is not valid JSON",
        ),
        ([{"role": "user", "content": "u"}, {"role": "assistant", "tool_calls": [{"x": 1}]}], "chat", "tool_calls"),
        ([{"role": "developer", "content": ""}], "chat", "message 0: a developer message needs non-empty content"),
        ([{"role": "user", "content": [{"type": "text", "text": "x"}]}], "chat", "message 0: 'content' must be"),
        ([{"role": "system", "content": "s", "tools": [{"name": "f"}]}], "chat", "message 0: 'tools' must be"),
        (
            [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}],
            "thinking",
            "message 1: in thinking mode an assistant message after the last user message needs reasoning_content",
        ),
        ([{"role": "user", "content": "u"}], "fast", "thinking_mode must be 'chat' or 'thinking'"),
    ],
)
def test_invalid_conversations_raise_one_clear_value_error(messages: list, mode: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        encode_messages(messages, mode)


def test_encoding_error_carries_the_index() -> None:
    with pytest.raises(EncodingError) as caught:
        encode_messages([{"role": "tool", "content": "r"}], "chat", context=[{"role": "user", "content": "u"}])
    assert caught.value.index == 1
