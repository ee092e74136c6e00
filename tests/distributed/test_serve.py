"""`dsv32 serve --tensor-parallel-size 2` answers the `openai` SDK exactly as one process does for greedy requests:
chat, streamed chat (thinking included), and tool calls (free and forced)."""

from __future__ import annotations

import openai
import pytest

from tests.server.conftest import ServerProcess, server_factory  # noqa: F401 - the fixture

WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                                 "parameters": {"type": "object", "properties": {
                                                     "city": {"type": "string"}}, "required": ["city"]}}}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
GREEDY = {"temperature": 0.0, "max_tokens": 24, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def servers(server_factory) -> dict[str, ServerProcess]:  # noqa: F811 - the fixture
    flags = ("--enable-auto-tool-choice", "--tool-call-parser", "deepseek_v32", "--reasoning-parser", "deepseek_v3")
    return {"tp1": server_factory(*flags), "tp2": server_factory(*flags, "--tensor-parallel-size", "2")}


def _client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0, timeout=120)


def _chat(server: ServerProcess, **kwargs: object) -> dict[str, object]:
    message = _client(server).chat.completions.create(model="tiny", messages=USER,
                                                      **{**GREEDY, **kwargs}).choices[0].message
    calls = [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
    return {"content": message.content, "reasoning": getattr(message, "reasoning_content", None), "calls": calls}


def _stream(server: ServerProcess, **kwargs: object) -> tuple[str, str]:
    content, reasoning = [], []
    for chunk in _client(server).chat.completions.create(model="tiny", messages=USER, stream=True,
                                                         **{**GREEDY, **kwargs}):
        if chunk.choices:
            delta = chunk.choices[0].delta
            content.append(delta.content or "")
            reasoning.append(getattr(delta, "reasoning_content", None) or "")
    return "".join(content), "".join(reasoning)


def test_chat_is_the_same(servers) -> None:
    assert _chat(servers["tp2"]) == _chat(servers["tp1"])


def test_streamed_thinking_chat_is_the_same(servers) -> None:
    thinking = {"extra_body": {"ignore_eos": True, "chat_template_kwargs": {"thinking": True}}}
    one = _stream(servers["tp1"], **thinking)
    assert one[1], "thinking mode streams reasoning_content"
    assert _stream(servers["tp2"], **thinking) == one


@pytest.mark.parametrize("tool_choice", ["auto", "required"])
def test_tool_calls_are_the_same(servers, tool_choice: str) -> None:
    # Forced, the grammar makes even random weights write a whole call (it ends the request when complete).
    budget = {"max_tokens": 200, "extra_body": {}} if tool_choice == "required" else {}
    one = _chat(servers["tp1"], tools=[WEATHER_TOOL], tool_choice=tool_choice, **budget)
    if tool_choice == "required":
        assert one["calls"] and one["calls"][0][0] == "get_weather", one
    assert _chat(servers["tp2"], tools=[WEATHER_TOOL], tool_choice=tool_choice, **budget) == one
