"""`dsv32 eval demo`: the held-out draws, the prompts the no-grammar and grammar variants render, every scorer on
right and wrong answers, the Wilson interval, an end-to-end run against the fake server's scripted answers, and the
CLI's errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dsv32.cli import main as cli_main
from dsv32.encoding.requests import prepare_chat_request
from dsv32.eval import demo
from dsv32.train.corpus import CALCULATOR, GET_WEATHER, HELD_OUT_CITIES, examples, held_out_pair
from tests.bench.fake_server import FakeServerConfig, running_server


def test_draws_are_seeded_distinct_and_held_out() -> None:
    sums = demo.arithmetic_cases(50, seed=0)
    assert sums == demo.arithmetic_cases(50, seed=0) != demo.arithmetic_cases(50, seed=1)
    questions = [case.request["messages"][0]["content"] for case in sums]
    assert len(set(questions)) == 50 and demo.arithmetic_cases(5, seed=0) == sums[:5]
    for case, question in zip(sums, questions, strict=True):
        a, b = (int(word.rstrip("?")) for word in question.split()[2::2])
        assert question == f"What is {a} + {b}?" and held_out_pair(a, b) and 10 <= min(a, b) <= max(a, b) <= 99
        assert case.expected == {"answer": str(a + b)} and case.request["chat_template_kwargs"] == {"thinking": True}

    weather = demo.tools_cases(50, seed=0)
    cities = [case.expected["tool_call"]["arguments"]["city"] for case in weather]
    assert sorted(cities) == sorted(HELD_OUT_CITIES)  # each held-out city once, however many are asked for
    assert [c.expected["tool_call"]["arguments"]["city"] for c in demo.tools_cases(5, seed=0)] == cities[:5]
    for case, city in zip(weather, cities, strict=True):
        assert case.request == {"messages": [{"role": "user", "content": f"What's the weather like in {city}?"}],
                                "tools": [GET_WEATHER, CALCULATOR]}


def test_json_variants_render_the_corpus_prompt_without_and_with_the_grammar() -> None:
    cases = demo.json_cases(30, seed=3)
    plain, strict = cases[:30], cases[30:]
    for example, without, enforced in zip(examples(30, 3, split="heldout", tasks=("json",)), plain, strict,
                                          strict=True):
        prompt = prepare_chat_request(**example.request).prompt
        assert "## Response Format:" in prompt
        assert "response_format" not in without.request and without.request["messages"][0]["role"] == "system"
        assert prepare_chat_request(**without.request).prompt == prompt
        assert enforced.request["response_format"]["json_schema"]["strict"] is True
        assert prepare_chat_request(**enforced.request).prompt == prompt
        assert (without.category, enforced.category) == ("json", "json+grammar")
        assert without.expected == enforced.expected == example.expected


@pytest.mark.parametrize(("message", "right"), [
    ({"content": "The answer is 123.", "reasoning_content": "ones: ..."}, True),
    ({"content": "48 + 75 = 123"}, True),
    ({"content": "I am not sure.", "reasoning_content": "48 + 75 = 123"}, False),  # only in the reasoning
    ({"content": "48 + 75 = 123</think>It is 124."}, False),  # a server without a reasoning parser
    ({"content": "48 + 75 = 124</think>It is 123."}, True),
    ({"content": "It is 1234."}, False),
    ({"content": "It is 123.5"}, False),
    ({"content": None, "tool_calls": []}, False),
])
def test_arithmetic_counts_the_sum_in_the_final_answer_only(message: dict[str, Any], right: bool) -> None:
    assert demo.score_arithmetic(message, {"answer": "123"}) == {"correct": right}


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": "call_0", "type": "function", "function": {"name": name, "arguments": arguments}}


@pytest.mark.parametrize(("calls", "correct", "right_tool"), [
    ([_call("get_weather", '{"city": "Velmora"}')], True, True),
    ([_call("get_weather", '{"city":"Velmora"}'), _call("calculator", '{"expression": "1 + 1"}')], True, True),
    ([_call("get_weather", '{"city": "Velmora", "unit": "celsius"}')], False, True),  # an extra key
    ([_call("get_weather", '{"city": "velmora"}')], False, True),
    ([_call("get_weather", '{"city": "Velmora"')], False, True),  # arguments not JSON
    ([_call("calculator", '{"city": "Velmora"}')], False, False),
    ([_call("calculator", '{"expression": "1"}'), _call("get_weather", '{"city": "Velmora"}')], False, False),
    ([], False, False),
    (None, False, False),
])
def test_tools_scores_the_first_call(calls: list[dict[str, Any]] | None, correct: bool, right_tool: bool) -> None:
    expected = {"tool_call": {"name": "get_weather", "arguments": {"city": "Velmora"}}}
    message = {"content": "", "tool_calls": calls}
    assert demo.score_tools(message, expected) == {"correct": correct, "right_tool": right_tool}


PERSON_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                 "required": ["name", "age"]}


@pytest.mark.parametrize(("content", "valid", "exact"), [
    ('{"name": "Alice", "age": 30}', True, True),
    ('  {"age": 30, "name": "Alice"}\n', True, True),
    ('{"name": "Bob", "age": 31}', True, False),  # valid against the schema, not the expected value
    ('{"name": "Alice", "age": 30', False, False),  # not JSON
    ('```json\n{"name": "Alice", "age": 30}\n```', False, False),
    ('{"name": "Alice"}', False, False),  # a required key missing
    ('{"name": "Alice", "age": "30"}', False, False),  # a wrong type
    ("", False, False),
])
def test_json_validates_against_the_schema(content: str, valid: bool, exact: bool) -> None:
    expected = {"json": {"name": "Alice", "age": 30}, "schema": PERSON_SCHEMA}
    assert demo.score_json({"content": content}, expected) == {"correct": valid, "exact_value": exact}


def test_wilson_interval() -> None:
    assert demo.wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert demo.wilson_interval(0, 5) == pytest.approx((0.0, 0.4345), abs=1e-4)
    assert demo.wilson_interval(5, 5) == pytest.approx((0.5655, 1.0), abs=1e-4)
    assert demo.wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)


def scripted_reply(cases: list[demo.Case]) -> Any:
    """Answers by the question: arithmetic right but for the first two (the sum only in the reasoning); tools: right,
    an extra argument, the wrong tool, no call, right; JSON without a grammar: not JSON, missing a key, then right;
    with the grammar always right."""
    by_question = {(case.category, case.request["messages"][-1]["content"]): (index, case)
                   for category in demo.METRICS
                   for index, case in enumerate(c for c in cases if c.category == category)}

    def reply(body: dict[str, Any]) -> dict[str, Any]:
        question = body["messages"][-1]["content"]
        category = ("tools" if "tools" in body else "json+grammar" if "response_format" in body
                    else "json" if body["messages"][0]["role"] == "system" else "arithmetic")
        index, case = by_question[(category, question)]
        if category == "arithmetic":
            answer = case.expected["answer"]
            return ({"content": "I am not sure.", "reasoning_content": f"= {answer}"} if index < 2
                    else {"content": f"The answer is {answer}.", "reasoning_content": "adding"})
        if category == "tools":
            city = case.expected["tool_call"]["arguments"]["city"]
            calls = [[_call("get_weather", json.dumps({"city": city}))],
                     [_call("get_weather", json.dumps({"city": city, "unit": "C"}))],
                     [_call("calculator", json.dumps({"expression": city}))], [],
                     [_call("get_weather", json.dumps({"city": city}))]][index]
            return {"content": "" if calls else f"I cannot check {city}.", "tool_calls": calls}
        value = case.expected["json"]
        if category == "json" and index == 0:
            return {"content": "Sure! " + json.dumps(value)}
        if category == "json" and index == 1:
            return {"content": "{}"}
        return {"content": json.dumps(value)}

    return reply


def test_end_to_end_against_fake_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = [case for task in demo.TASKS for case in demo.CASE_MAKERS[task](5, 7)]
    config = FakeServerConfig(reply=scripted_reply(cases))
    output = tmp_path / "demo.json"
    with running_server(config) as url:
        code = cli_main(["eval", "demo", "--base-url", f"{url}/v1", "--num-prompts", "5", "--seed", "7",
                         "--concurrency", "3", "--disable-tqdm", "--output", str(output)])
    out = capsys.readouterr().out
    assert code == 0
    assert "|arithmetic  |sum in answer   |   5|  0.6000| 0.2307-0.8824 |" in out
    assert "|tools       |tool + arguments|   5|  0.4000| 0.1176-0.7693 |" in out
    assert "|            |tool name       |   5|  0.6000| 0.2307-0.8824 |" in out
    assert "|json        |schema-valid    |   5|  0.6000|" in out
    assert "|json+grammar|schema-valid    |   5|  1.0000| 0.5655-1.0000 |" in out
    saved = json.loads(output.read_text())
    results = saved["results"]
    assert results["tools"]["right_tool"] == {"accuracy": 0.6, "hits": 3, "n": 5,
                                              "ci95_wilson": pytest.approx([0.2307, 0.8824], abs=1e-4)}
    assert results["json"]["exact_value"]["hits"] == 3 and results["json+grammar"]["exact_value"]["hits"] == 5
    assert saved["config"]["seed"] == 7 and saved["config"]["model"] == "fake-model"
    assert len(saved["samples"]) == 20 == len(config.requests)
    first = saved["samples"][0]
    assert first["category"] == "arithmetic" and first["scores"] == {"correct": False}
    assert (first["finish_reason"], first["prompt_tokens"], first["completion_tokens"]) == ("stop", 7, 4)
    assert first["response"]["reasoning_content"] == f"= {first['expected']['answer']}"

    bodies = {"json+grammar" if "response_format" in body else
              "tools" if "tools" in body else
              "json" if body["messages"][0]["role"] == "system" else "arithmetic": body for body in config.requests}
    assert all(body["temperature"] == 0.0 and body["seed"] == 7 and body["model"] == "fake-model"
               for body in config.requests)
    assert bodies["arithmetic"]["max_tokens"] == 256 and bodies["arithmetic"]["chat_template_kwargs"] == {
        "thinking": True}
    assert bodies["tools"]["max_tokens"] == 96 and bodies["tools"]["tools"] == [GET_WEATHER, CALCULATOR]
    assert "tool_choice" not in bodies["tools"]
    assert bodies["json+grammar"]["response_format"]["json_schema"]["strict"] is True
    assert bodies["json"]["max_tokens"] == bodies["json+grammar"]["max_tokens"] == 256


def test_tasks_choose_the_categories(capsys: pytest.CaptureFixture[str]) -> None:
    cases = demo.tools_cases(2, 0)
    config = FakeServerConfig(reply=lambda body: {"content": "", "tool_calls": [_call("get_weather", "{}")]})
    with running_server(config) as url:
        code = cli_main(["eval", "demo", "--port", url.rsplit(":", 1)[1], "--tasks", "tools", "--num-prompts", "2",
                         "--disable-tqdm"])
    out = capsys.readouterr().out
    assert code == 0 and "|tools       |tool + arguments|   2|  0.0000|" in out and "arithmetic" not in out
    assert [body["messages"] for body in config.requests] == [case.request["messages"] for case in cases]


@pytest.mark.parametrize(("flags", "message"), [
    (["--tasks", "arithmetic,chess"], "unknown task(s) chess"),
    (["--tasks", ","], "unknown task(s) (none given)"),
    (["--num-prompts", "0"], "--num-prompts"),
    (["--concurrency", "0"], "--concurrency"),
    (["--num-prompts", "5000"], "holds out 972 pairs"),
])
def test_bad_flags_are_one_line_errors_with_status_2(flags: list[str], message: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["eval", "demo", "--base-url", "http://127.0.0.1:9", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err


def test_unreachable_server_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["eval", "demo", "--base-url", "http://127.0.0.1:9", "--ready-check-timeout-sec", "0",
                     "--disable-tqdm"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("error: cannot reach http://127.0.0.1:9") and "\n" not in err
