"""Property tests: encode -> strip the prompt -> parse gives the assistant message back, and the streaming parser
gives the non-streaming result for every split of the text (generated messages and fuzzed malformed output)."""

import copy
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from dsv32.encoding import (
    StreamingParser,
    encode_messages,
    merge_deltas,
    parse_message_from_completion_text,
    thinking_mode_for_prompt,
)

EOS = "<｜end▁of▁sentence｜>"
# Strings the reference parser forbids inside content/reasoning, plus the plain tags our parser also reads as calls.
RESERVED = ("<｜begin▁of▁sentence｜>", EOS, "<think>", "</think>", "｜DSML｜", "<invoke", "<function_calls")

CHARACTERS = st.sampled_from(list('aZ0 \n\t<>/="\'{}[]:,\\é中🙂｜▁'))
TRICKY = st.sampled_from(
    ["</parameter>", '<parameter name="x">', "</invoke>", "\n\n", "<｜", "｜DSM", "</think", "<think", "null", "{}"]
)


def free_text(min_size: int = 0) -> st.SearchStrategy[str]:
    """Unicode, quotes, '<', newlines and near-miss tags, but none of the reserved strings."""
    pieces = st.lists(st.one_of(CHARACTERS, TRICKY), min_size=min_size, max_size=12)
    return pieces.map("".join).filter(lambda text: not any(reserved in text for reserved in RESERVED))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | free_text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(free_text(), children, max_size=3),
    max_leaves=8,
)
KEYS = free_text().filter(lambda key: '"' not in key)
TOOL_NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.:-]{0,12}", fullmatch=True)


@st.composite
def tool_calls(draw: st.DrawFn) -> dict:
    arguments = draw(st.dictionaries(KEYS, st.one_of(free_text(), JSON_VALUES), max_size=4))
    return {
        "type": "function",
        "function": {"name": draw(TOOL_NAMES), "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


@st.composite
def assistant_messages(draw: st.DrawFn, thinking: bool) -> dict:
    message: dict = {"role": "assistant", "content": draw(st.none() | free_text())}
    calls = draw(st.lists(tool_calls(), max_size=3))
    if calls:
        message["tool_calls"] = calls
    reasoning = draw(st.none() | free_text(min_size=0 if calls or not thinking else 1))
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    if thinking and not calls and not reasoning:
        message["reasoning_content"] = "r"
    return message


HISTORIES = [
    [{"role": "user", "content": "question"}],
    [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "question"},
        {
            "role": "assistant",
            "reasoning_content": "need a tool",
            "tool_calls": [{"type": "function", "function": {"name": "t", "arguments": "{}"}}],
        },
        {"role": "tool", "content": "result"},
    ],
]


def expected_parse(message: dict, thinking: bool) -> dict:
    return {
        "role": "assistant",
        "content": message.get("content") or "",
        "reasoning_content": (message.get("reasoning_content") or "") if thinking else "",
        "tool_calls": copy.deepcopy(message.get("tool_calls", [])),
    }


def without_ids(message: dict) -> dict:
    message = copy.deepcopy(message)
    for call in message["tool_calls"]:
        call.pop("id")
    return message


def parse_in_pieces(text: str, cuts: list[int], thinking_mode: str) -> dict:
    parser = StreamingParser(thinking_mode)
    deltas = []
    start = 0
    for cut in sorted(cuts) + [len(text)]:
        deltas += parser.feed(text[start:cut])
        start = cut
    deltas += parser.finish()
    return merge_deltas(deltas)


@st.composite
def conversations(draw: st.DrawFn) -> tuple[list, dict, str]:
    mode = draw(st.sampled_from(["chat", "thinking"]))
    history = draw(st.sampled_from(HISTORIES))
    return history, draw(assistant_messages(mode == "thinking")), mode


@settings(max_examples=150, deadline=None)
@given(conversations(), st.data())
def test_encode_then_parse_round_trips_and_streaming_agrees(conversation: tuple, data: st.DataObject) -> None:
    history, message, mode = conversation
    prompt = encode_messages(history, mode)
    completion = encode_messages(history + [message], mode)[len(prompt) :]
    parser_mode = thinking_mode_for_prompt(prompt)
    assert parser_mode == mode

    parsed = parse_message_from_completion_text(completion, parser_mode)
    assert without_ids(parsed) == expected_parse(message, mode == "thinking")
    assert all(call["id"].startswith("call_") for call in parsed["tool_calls"])

    cuts = data.draw(st.lists(st.integers(0, len(completion)), max_size=12))
    assert without_ids(parse_in_pieces(completion, cuts, parser_mode)) == without_ids(parsed)


FRAGMENTS = st.sampled_from(
    [
        "\n\n<｜DSML｜function_calls>\n",
        "<｜DSML｜function_calls>",
        "</｜DSML｜function_calls>",
        '<｜DSML｜invoke name="f">\n',
        '<｜DSML｜invoke name="g">',
        "<｜DSML｜invoke",
        "</｜DSML｜invoke>\n",
        '<｜DSML｜parameter name="a" string="true">',
        '<｜DSML｜parameter name="b" string="false">',
        '<｜DSML｜parameter name="c">',
        "</｜DSML｜parameter>\n",
        "<function_calls>",
        '<invoke name="f">',
        '<parameter name="p" string="true">',
        "</parameter>",
        "</invoke>",
        '{"x": [1, 2]}',
        "[1, 2",
        "</think>",
        "<think>",
        EOS,
        "\n",
        " ",
        "<",
        "｜DSML｜",
        'name="q">',
        "text",
        "中文",
    ]
)


@st.composite
def damaged_completions(draw: st.DrawFn) -> str:
    """A well-formed completion with pieces cut out, fragments put in, or its end cut off."""
    history, message, mode = draw(conversations())
    prompt = encode_messages(history, mode)
    text = encode_messages(history + [message], mode)[len(prompt) :]
    for _ in range(draw(st.integers(1, 3))):
        start = draw(st.integers(0, len(text)))
        end = draw(st.integers(start, min(len(text), start + 12)))
        text = text[:start] + draw(st.just("") | FRAGMENTS) + text[end:]
    return text


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(st.lists(st.one_of(FRAGMENTS, free_text(min_size=1)), max_size=25).map("".join), damaged_completions()),
    st.sampled_from(["chat", "thinking"]),
    st.data(),
)
def test_malformed_output_never_raises_and_streaming_agrees(text: str, mode: str, data: st.DataObject) -> None:
    whole = parse_message_from_completion_text(text, mode)
    for call in whole["tool_calls"]:
        assert isinstance(json.loads(call["function"]["arguments"]), dict)
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=20))
    assert without_ids(parse_in_pieces(text, cuts, mode)) == without_ids(whole)
