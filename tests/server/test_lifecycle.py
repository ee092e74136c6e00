"""Overload and shutdown of a real `dsv32 serve`: a full waiting queue answers 503 (and the admitted requests still
finish), and SIGTERM lets in-flight requests end cleanly - finished or aborted with a proper final chunk - before
both processes (server and engine core) exit, the server with 0."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

from tests.server.conftest import ServerProcess, wait_until_gone

pytestmark = pytest.mark.e2e

BODY = {"prompt": "Count with me:", "max_tokens": 400, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(server_factory) -> ServerProcess:
    # One running request and one waiting; anything beyond is refused.
    return server_factory("--max-num-seqs", "1", "--max-waiting-requests", "1", "--shutdown-timeout", "1",
                          "--log-requests")


def test_full_waiting_queue_answers_503(server: ServerProcess) -> None:
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=300) as client:
            first = asyncio.create_task(client.post("/v1/completions", json={**BODY, "max_tokens": 150}))
            # The others arrive once it has been admitted (it holds the one slot).
            admitted = await asyncio.to_thread(server.wait_for_metrics,
                                               lambda m: m["vllm:num_requests_running"] == 1)
            assert admitted["vllm:num_requests_running"] == 1, "the first request was never admitted"
            others = [asyncio.create_task(client.post("/v1/completions", json={**BODY, "max_tokens": 20}))
                      for _ in range(4)]
            return [await first, *[await task for task in others]]

    responses = asyncio.run(run())
    statuses = [r.status_code for r in responses]
    assert statuses[0] == 200 and statuses.count(503) >= 2 and set(statuses) <= {200, 503}, statuses
    for response in responses:
        if response.status_code == 503:
            error = response.json()["error"]
            assert error["code"] == 503 and error["type"] == "ServiceUnavailableError"
            assert "overloaded" in error["message"]
        else:
            assert response.json()["choices"][0]["finish_reason"] == "length"
    rejected = server.metrics()["dsv32:requests_rejected_total{reason=overloaded}"]
    assert rejected == statuses.count(503)
    assert BODY["prompt"] in server.log()  # --log-requests logs the prompt text


def test_sigterm_ends_in_flight_streams_cleanly_and_exits_zero(server: ServerProcess) -> None:
    lines: list[str] = []
    failure: list[BaseException] = []

    def stream() -> None:
        body = {**BODY, "max_tokens": 1000, "stream": True}
        try:
            with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, timeout=120) as response:
                lines.extend(line for line in response.iter_lines() if line)
        except BaseException as exc:  # reported by the assertions below
            failure.append(exc)

    reader = threading.Thread(target=stream)
    reader.start()
    deadline = time.monotonic() + 60
    while len(lines) < 3 and time.monotonic() < deadline and reader.is_alive():
        time.sleep(0.05)
    assert len(lines) >= 3, "the stream never started"
    engine_pid = server.engine_pid()
    exit_code = server.stop(timeout_s=60)
    reader.join(timeout=60)
    assert not failure, failure
    assert exit_code == 0
    assert lines[-1] == "data: [DONE]"
    finishes = [json.loads(line[6:])["choices"][0]["finish_reason"] for line in lines[:-1]]
    assert finishes[-1] in ("abort", "length") and all(f is None for f in finishes[:-1])
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.base_url}/health", timeout=2)
    assert wait_until_gone(engine_pid, 10), "the engine process outlived the server"
