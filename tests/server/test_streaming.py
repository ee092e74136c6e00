"""Streaming under stress against a real `dsv32 serve`, whose engine core runs in a process of its own: a client
that hangs up mid-stream gets its request aborted in the engine process and its KV blocks back (seen through
/metrics), many concurrent streams all finish with exact usage, and the `dsv32 chat` terminal client talks to the
server."""

from __future__ import annotations

import argparse
import asyncio
import io
import json

import httpx
import pytest

from dsv32.client.chat import run_chat_client
from tests.server.conftest import ServerProcess

USER = [{"role": "user", "content": "Tell me a long story."}]


@pytest.fixture(scope="module")
def server(server_factory) -> ServerProcess:
    return server_factory("--max-num-seqs", "16")


def test_disconnect_mid_stream_aborts_and_frees_the_cache(server: ServerProcess) -> None:
    before = server.metrics()
    total_blocks = before["dsv32:kv_cache_total_blocks"]
    assert before["dsv32:kv_cache_free_blocks"] == total_blocks
    aborted_before = before.get("vllm:request_success_total{finished_reason=abort}", 0)
    body = {"messages": USER, "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            received = [next(lines) for _ in range(6)]  # role chunk and a few tokens, then hang up
            assert received[0].startswith("data: ")
            running = server.metrics()
            assert running["vllm:num_requests_running"] == 1
            assert running["dsv32:kv_cache_free_blocks"] < total_blocks
    after = server.wait_for_metrics(
        lambda m: m["vllm:num_requests_running"] == 0 and m["dsv32:kv_cache_free_blocks"] == total_blocks)
    assert after["vllm:num_requests_running"] == 0 and after["vllm:num_requests_waiting"] == 0
    assert after["dsv32:kv_cache_free_blocks"] == total_blocks and after["vllm:kv_cache_usage_perc"] == 0
    assert after["vllm:request_success_total{finished_reason=abort}"] == aborted_before + 1
    # Far fewer than the 900 tokens asked for were generated: the engine really stopped.
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] < 900


def test_disconnect_of_non_streaming_request_aborts_it(server: ServerProcess) -> None:
    before = server.metrics()
    aborted_before = before.get("vllm:request_success_total{finished_reason=abort}", 0)
    body = {"prompt": "Once upon a time", "max_tokens": 900, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=1.5)
    after = server.wait_for_metrics(
        lambda m: m.get("vllm:request_success_total{finished_reason=abort}", 0) > aborted_before)
    assert after["vllm:request_success_total{finished_reason=abort}"] == aborted_before + 1
    assert after["dsv32:kv_cache_free_blocks"] == after["dsv32:kv_cache_total_blocks"]


async def _stream_one(client: httpx.AsyncClient, index: int) -> tuple[int, dict, str]:
    max_tokens = 3 + index % 5
    body = {"messages": [{"role": "user", "content": f"Client {index} says hello" + "!" * index}],
            "max_tokens": max_tokens, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    usage, finish, text = None, None, ""
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"]:
                text += chunk["choices"][0]["delta"].get("content") or ""
                finish = chunk["choices"][0]["finish_reason"] or finish
            else:
                usage = chunk["usage"]
    assert finish == "length"
    return max_tokens, usage, body["messages"][0]["content"]


def test_many_concurrent_streams_finish_with_exact_usage(server: ServerProcess) -> None:
    async def run() -> list[tuple[int, dict, str]]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=300) as client:
            return await asyncio.gather(*(_stream_one(client, i) for i in range(24)))

    results = asyncio.run(run())
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        for max_tokens, usage, content in results:
            expected_prompt = http.post("/tokenize", json={"messages": [{"role": "user", "content": content}]})
            assert usage["completion_tokens"] == max_tokens
            assert usage["prompt_tokens"] == expected_prompt.json()["count"]
            assert usage["total_tokens"] == usage["prompt_tokens"] + max_tokens
    final = server.wait_for_metrics(lambda m: m["vllm:num_requests_running"] == 0)
    assert final["dsv32:kv_cache_free_blocks"] == final["dsv32:kv_cache_total_blocks"]


def test_chat_client_shows_thinking_apart(server: ServerProcess) -> None:
    args = argparse.Namespace(url=server.base_url, model=None, api_key=None, system="Be brief.", thinking=True,
                              max_tokens=4, temperature=None, top_p=None)
    stdin = io.StringIO("hello\n/thinking off\nagain\n/clear\n/exit\n")
    out = io.StringIO()
    assert run_chat_client(args, stdin=stdin, out=out) == 0
    text = out.getvalue()
    assert "chatting with tiny" in text and "thinking: " in text and "(thinking off)" in text
    assert "(conversation cleared)" in text


def test_chat_client_reports_an_unreachable_server(capsys: pytest.CaptureFixture[str]) -> None:
    args = argparse.Namespace(url="http://127.0.0.1:9", model=None, api_key=None, system=None, thinking=False,
                              max_tokens=4, temperature=None, top_p=None)
    assert run_chat_client(args, stdin=io.StringIO(""), out=io.StringIO()) == 1
    assert "cannot reach" in capsys.readouterr().err
