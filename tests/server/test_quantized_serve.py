"""`dsv32 serve --quantization int8|int4` answers the openai SDK like the unquantised server (chat, streaming, tool
calls) and says its mode and weight bytes in /get_server_info and the start-up log; a bad mode is a one-line error."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import openai
import pytest

from tests.server.conftest import BASE_ARGS, ServerProcess

pytestmark = pytest.mark.e2e

WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                                 "parameters": {"type": "object", "properties": {
                                                     "city": {"type": "string"}}, "required": ["city"]}}}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def servers(server_factory) -> dict[str | None, ServerProcess]:
    return {mode: server_factory("tiny", *(("--quantization", mode) if mode else ()))
            for mode in (None, "int8", "int4")}


def _client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_chat_stream_and_tools_answer(servers: dict[str | None, ServerProcess], mode: str) -> None:
    client = _client(servers[mode])
    reply = client.chat.completions.create(model="tiny", messages=USER, max_tokens=8, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 8
    chunks = list(client.chat.completions.create(model="tiny", messages=USER, max_tokens=8, stream=True, temperature=0,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[-1].usage.completion_tokens == 8
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    # The random model will not call a tool on its own: the tool loop's request side (a call and its result in
    # the history) must run as on the unquantised server.
    history = [*USER, {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_0123456789abcdef01234567", "type": "function",
                    "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
               {"role": "tool", "tool_call_id": "call_0123456789abcdef01234567", "content": "sunny, 21C"}]
    after_tool = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER_TOOL], max_tokens=5,
                                                extra_body={"ignore_eos": True})
    assert after_tool.usage.completion_tokens == 5

def test_server_info_and_log_say_mode_and_weight_bytes(servers: dict[str | None, ServerProcess]) -> None:
    info = {mode: httpx.get(f"{server.base_url}/get_server_info").json() for mode, server in servers.items()}
    assert [info[mode]["quantization"] for mode in (None, "int8", "int4")] == [None, "int8", "int4"]
    assert info["int4"]["weight_bytes"] < info["int8"]["weight_bytes"] < info[None]["weight_bytes"]
    assert "(quantization: int8)" in servers["int8"].log()


def test_quantization_the_checkpoint_lacks_is_one_line() -> None:
    result = subprocess.run([sys.executable, "-m", "dsv32.cli", "serve", "tiny", *BASE_ARGS, "--quantization",
                             "w8a8_int8"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--quantization w8a8_int8: the checkpoint's config.json 'quantization_config.quant_method'" in result.stderr
