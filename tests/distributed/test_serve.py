"""`dsv32 serve --tensor-parallel-size 2` and `--data-parallel-size 2 --enable-expert-parallel` answer the `openai`
SDK exactly as one process does for greedy requests: chat, streamed chat (thinking included), and tool calls (free
and forced); `/get_server_info` reports the layout as SGLang does."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server.conftest import ServerProcess, server_factory  # noqa: F401 - the fixture

pytestmark = pytest.mark.e2e

WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                                 "parameters": {"type": "object", "properties": {
                                                     "city": {"type": "string"}}, "required": ["city"]}}}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
GREEDY = {"temperature": 0.0, "max_tokens": 24, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def servers(server_factory) -> dict[str, ServerProcess]:  # noqa: F811 - the fixture
    flags = ("--enable-auto-tool-choice", "--tool-call-parser", "deepseek_v32", "--reasoning-parser", "deepseek_v3")
    return {"tp1": server_factory(*flags), "tp2": server_factory(*flags, "--tensor-parallel-size", "2"),
            "dp2_ep": server_factory(*flags, "--data-parallel-size", "2", "--enable-expert-parallel")}


PARALLEL = ["tp2", "dp2_ep"]


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


@pytest.mark.parametrize("layout", PARALLEL)
def test_chat_is_the_same(servers, layout: str) -> None:
    assert _chat(servers[layout]) == _chat(servers["tp1"])


@pytest.mark.parametrize("layout", PARALLEL)
def test_streamed_thinking_chat_is_the_same(servers, layout: str) -> None:
    thinking = {"extra_body": {"ignore_eos": True, "chat_template_kwargs": {"thinking": True}}}
    one = _stream(servers["tp1"], **thinking)
    assert one[1], "thinking mode streams reasoning_content"
    assert _stream(servers[layout], **thinking) == one


@pytest.mark.parametrize("layout", PARALLEL)
@pytest.mark.parametrize("tool_choice", ["auto", "required"])
def test_tool_calls_are_the_same(servers, layout: str, tool_choice: str) -> None:
    # Forced, the grammar makes even random weights write a whole call (it ends the request when complete).
    budget = {"max_tokens": 200, "extra_body": {}} if tool_choice == "required" else {}
    one = _chat(servers["tp1"], tools=[WEATHER_TOOL], tool_choice=tool_choice, **budget)
    if tool_choice == "required":
        assert one["calls"] and one["calls"][0][0] == "get_weather", one
    assert _chat(servers[layout], tools=[WEATHER_TOOL], tool_choice=tool_choice, **budget) == one


def test_server_info_reports_the_layout(servers) -> None:
    tp2 = httpx.get(f"{servers['tp2'].base_url}/get_server_info", timeout=10).json()
    dp2 = httpx.get(f"{servers['dp2_ep'].base_url}/get_server_info", timeout=10).json()
    assert (tp2["tp_size"], tp2["dp_size"], tp2["ep_size"], tp2["enable_dp_attention"]) == (2, 1, 1, False)
    assert (dp2["tp_size"], dp2["dp_size"], dp2["ep_size"], dp2["enable_dp_attention"]) == (2, 2, 2, True)
