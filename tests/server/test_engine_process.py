"""The engine-core process of a real `dsv32 serve`: the engine runs in a child process of its own with every core;
killed mid-request, the requests in flight get a 503 at once, /health turns 503 and nothing hangs; a hung engine
(stopped mid-step) is found by the watchdog after --engine-step-timeout and fails the same way; a server that is
killed takes its engine process with it; SIGTERM while the model loads exits 0 and leaves no process behind.
(Streaming and abort on client disconnect over this boundary: test_streaming.py; SIGTERM draining: test_lifecycle.)"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import process_alive, spawn_server, wait_until_gone

pytestmark = pytest.mark.e2e

LONG = {"prompt": "Count with me:", "max_tokens": 900, "ignore_eos": True}


def parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_engine_runs_in_a_child_process_with_every_core(server_factory) -> None:
    server = server_factory()
    pid = server.engine_pid()
    assert pid != server.process.pid and process_alive(pid) and parent_pid(pid) == server.process.pid
    if "OMP_NUM_THREADS" not in os.environ:
        assert f"engine core: {len(os.sched_getaffinity(0))} model thread(s)" in server.log()
    reply = httpx.post(f"{server.base_url}/v1/completions", json={**LONG, "max_tokens": 4}, timeout=60).json()
    assert reply["usage"]["completion_tokens"] == 4
    assert server.stop() == 0
    assert wait_until_gone(pid, 10), "the engine process outlived a clean shutdown"


def test_killed_engine_fails_requests_in_flight_with_503_and_health_503(server_factory) -> None:
    server = server_factory()
    pid = server.engine_pid()
    lines: list[str] = []
    plain: list[httpx.Response] = []

    def stream() -> None:
        with httpx.stream("POST", f"{server.base_url}/v1/completions", json={**LONG, "stream": True},
                          timeout=60) as response:
            lines.extend(line for line in response.iter_lines() if line)

    def non_streaming() -> None:
        plain.append(httpx.post(f"{server.base_url}/v1/completions", json=LONG, timeout=60))

    threads = [threading.Thread(target=stream), threading.Thread(target=non_streaming)]
    for thread in threads:
        thread.start()
    server.wait_for_metrics(lambda m: m["vllm:num_requests_running"] == 2)
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    for thread in threads:
        thread.join(timeout=30)
    answered_in = time.monotonic() - killed_at
    assert not any(thread.is_alive() for thread in threads), "a request hung after the engine died"
    assert answered_in < 10, answered_in
    # The stream had started (status 200 sent): its error comes as a final SSE event, then [DONE].
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][6:])["error"]
    assert error["code"] == 503 and error["type"] == "ServiceUnavailableError"
    assert plain[0].status_code == 503 and plain[0].json()["error"]["code"] == 503
    assert httpx.get(f"{server.base_url}/health", timeout=5).status_code == 503
    late = httpx.post(f"{server.base_url}/v1/completions", json={**LONG, "max_tokens": 2}, timeout=10)
    assert late.status_code == 503 and "not running" in late.json()["error"]["message"]
    assert "engine core process died" in server.log()
    assert server.stop(timeout_s=30) == 0
    assert not process_alive(pid)


def test_hung_engine_is_failed_after_the_step_timeout(server_factory) -> None:
    server = server_factory("--engine-step-timeout", "3")
    pid = server.engine_pid()
    idle = httpx.post(f"{server.base_url}/v1/completions", json={**LONG, "max_tokens": 2}, timeout=60)
    assert idle.status_code == 200
    time.sleep(4)  # idle time longer than the timeout is not a hang
    assert httpx.get(f"{server.base_url}/health", timeout=5).status_code == 200
    answers: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: answers.append(
        httpx.post(f"{server.base_url}/v1/completions", json=LONG, timeout=60)))
    thread.start()
    server.wait_for_metrics(lambda m: m["vllm:num_requests_running"] == 1)
    os.kill(pid, signal.SIGSTOP)  # a step that never ends
    stopped_at = time.monotonic()
    thread.join(timeout=30)
    assert not thread.is_alive(), "a request hung with the engine"
    assert time.monotonic() - stopped_at < 10
    assert answers[0].status_code == 503 and "no progress" in answers[0].json()["error"]["message"]
    assert httpx.get(f"{server.base_url}/health", timeout=5).status_code == 503
    assert wait_until_gone(pid, 10), "the hung engine process was not killed"
    assert server.stop(timeout_s=30) == 0


def test_killed_server_takes_its_engine_process_with_it(server_factory) -> None:
    server = server_factory()
    pid = server.engine_pid()
    server.process.kill()
    server.process.wait()
    assert wait_until_gone(pid, 10), "the engine process was orphaned"


def test_sigterm_while_loading_exits_cleanly(tmp_path: Path) -> None:
    server = spawn_server(tmp_path)
    try:
        pid = server.engine_pid()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0, server.log()[-3000:]
    finally:
        if server.process.poll() is None:
            server.process.kill()
    assert wait_until_gone(pid, 10), "the engine process outlived the server"
    log = server.log()
    assert "shutdown requested while loading the model" in log and "Traceback" not in log
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.base_url}/health", timeout=2)
