"""Launching one model over several processes with `dsv32 serve`: two "nodes" on 127.0.0.1 (one --headless), a
killed worker (local, and on the other node) ending everything cleanly, and one clear line for each launch
mistake (port in use, another layout on the other node, an unreachable master)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import (
    BASE_ARGS,
    TEST_MODEL,
    ServerProcess,
    free_port,
    server_factory,  # noqa: F401 - the fixture
    spawn_server,
    start_server,
    wait_until_gone,
    wait_until_healthy,
)

pytestmark = pytest.mark.e2e

# Everything ends within this many seconds of a worker's death (stated in the README).
FAULT_DEADLINE_S = 10.0
PROMPT = {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 24, "temperature": 0.0,
          "ignore_eos": True}


def children(pid: int) -> list[int]:
    """The model worker processes ``pid`` started (multiprocessing's resource tracker left out)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(int(child))
    return found


def complete(server: ServerProcess, **overrides: object) -> list[str]:
    reply = httpx.post(f"{server.base_url}/v1/completions", json={**PROMPT, **overrides, "logprobs": 0},
                       timeout=120).json()
    return reply["choices"][0]["logprobs"]["tokens"]


def spawn_headless(log_dir: Path, *args: str, flag: bool = True) -> tuple[subprocess.Popen[bytes], Path]:
    """A worker-only node (``flag=False``: without ``--headless``, which a node rank above 0 implies)."""
    log_path = log_dir / f"headless-{time.monotonic_ns()}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "dsv32.cli", "serve", TEST_MODEL, *BASE_ARGS,
                                    *(["--headless"] if flag else []), *args],
                                   stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return process, log_path


def stream_until_failure(server: ServerProcess, fault: Callable[[], None]) -> tuple[list[str], float]:
    """Start a long streamed completion, cause ``fault`` once tokens flow; the stream's lines and the seconds from
    the fault to its end."""
    lines: list[str] = []
    started = threading.Event()

    def stream() -> None:
        body = {**PROMPT, "max_tokens": 1000, "stream": True}  # max_model_len is 1024
        with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, timeout=120) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line:
                    lines.append(line)
                    started.set()

    thread = threading.Thread(target=stream)
    thread.start()
    assert started.wait(60), server.log()[-3000:]
    fault()
    fault_at = time.monotonic()
    thread.join(timeout=120)
    assert not thread.is_alive(), "the stream hung after a worker failed"
    return lines, time.monotonic() - fault_at


def kill(pid: int) -> Callable[[], None]:
    return lambda: os.kill(pid, signal.SIGKILL)


def assert_failed_cleanly(server: ServerProcess, lines: list[str], seconds: float, pids: list[int]) -> None:
    assert seconds < FAULT_DEADLINE_S, seconds
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["error"]["code"] == 503
    assert httpx.get(f"{server.base_url}/health", timeout=5).status_code == 503
    for pid in pids:
        assert wait_until_gone(pid, FAULT_DEADLINE_S), f"process {pid} outlived the failure"
    assert server.stop(timeout_s=30) == 0


@pytest.fixture(scope="module")
def tp1_tokens(server_factory) -> list[str]:  # noqa: F811 - the fixture
    server = server_factory()
    tokens = complete(server)
    server.stop()
    return tokens


def test_local_worker_killed_mid_request_ends_everything(server_factory, tp1_tokens) -> None:  # noqa: F811
    server = server_factory("-tp", "2")
    engine = server.engine_pid()
    assert complete(server) == tp1_tokens
    (worker,) = children(engine)
    lines, seconds = stream_until_failure(server, kill(worker))
    assert_failed_cleanly(server, lines, seconds, [engine, worker])
    assert "exited with code -9" in server.log()


def test_hung_worker_fails_the_step_after_the_distributed_timeout(server_factory) -> None:  # noqa: F811
    """A worker that stops answering (SIGSTOP: alive, silent) is a failure once a collective has waited
    --distributed-timeout; then everything ends as for a dead one."""
    timeout_s = 3
    server = server_factory("-tp", "2", "--distributed-timeout", str(timeout_s))
    engine = server.engine_pid()
    (worker,) = children(engine)
    lines, seconds = stream_until_failure(server, lambda: os.kill(worker, signal.SIGSTOP))
    assert_failed_cleanly(server, lines, seconds - timeout_s, [engine, worker])
    assert f"a rank did not answer within --distributed-timeout ({timeout_s} s)" in server.log()


def test_two_nodes_on_localhost_then_the_remote_worker_dies(tmp_path: Path, tp1_tokens) -> None:
    port = str(free_port())
    multi = ("-tp", "2", "--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", port)
    headless, headless_log = spawn_headless(tmp_path, *multi, "--node-rank", "1")
    server = None
    try:
        server = start_server(tmp_path, *multi, "--node-rank", "0")
        engine = server.engine_pid()
        assert children(engine) == [], "node 0 must not start node 1's rank"
        assert complete(server) == tp1_tokens
        (worker,) = children(headless.pid)
        lines, seconds = stream_until_failure(server, kill(worker))
        # The driver learns it from the collective that broke (no process of its own died).
        assert_failed_cleanly(server, lines, seconds, [engine])
        assert headless.wait(timeout=FAULT_DEADLINE_S) != 0
        assert "a model worker failed" in server.log()
    finally:
        stop_all(server, headless)
    assert "Traceback" not in headless_log.read_text()


def test_stopping_node_0_stops_the_headless_node(tmp_path: Path) -> None:
    """SGLang's spelling this time: --tp, --dist-init-addr, and no --headless on node 1."""
    multi = ("--tp", "2", "--nnodes", "2", "--dist-init-addr", f"127.0.0.1:{free_port()}")
    headless, _ = spawn_headless(tmp_path, *multi, "--node-rank", "1", flag=False)
    server = None
    try:
        server = start_server(tmp_path, *multi, "--node-rank", "0")
        worker = children(headless.pid)[0]
        assert server.stop() == 0
        assert headless.wait(timeout=FAULT_DEADLINE_S) == 0
        assert wait_until_gone(worker, FAULT_DEADLINE_S)
    finally:
        stop_all(server, headless)


def stop_all(server: ServerProcess | None, *processes: subprocess.Popen[bytes]) -> None:
    """However a test ends, none of its processes outlives it (SIGTERM, then SIGKILL)."""
    for process in ([server.process] if server is not None else []) + list(processes):
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _fails_with(process: subprocess.Popen[bytes], log: Path, text: str, within_s: float) -> None:
    try:
        code = process.wait(timeout=within_s)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running after {within_s}s; log:\n{log.read_text()[-3000:]}") from None
    output = log.read_text()
    assert code != 0 and text in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]


def test_master_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = spawn_server(tmp_path, "-tp", "2", "--master-port", str(port))
        try:
            _fails_with(server.process, server.log_path, f"--master-port {port} is already in use", 120)
        finally:
            stop_all(server)


def test_unreachable_master_is_one_line(tmp_path: Path) -> None:
    process, log = spawn_headless(tmp_path, "-tp", "2", "--nnodes", "2", "--node-rank", "1", "--master-port",
                                  str(free_port()), "--distributed-timeout", "3")
    try:
        _fails_with(process, log, "cannot reach the master at 127.0.0.1:", 60)
    finally:
        stop_all(None, process)


def test_other_layout_on_another_node_is_one_line_on_both(tmp_path: Path) -> None:
    port = str(free_port())
    server = spawn_server(tmp_path, "-tp", "2", "--nnodes", "2", "--master-port", port, "--distributed-timeout", "60")
    headless, log = spawn_headless(tmp_path, "-tp", "4", "--nnodes", "2", "--node-rank", "1", "--master-port", port)
    try:
        _fails_with(headless, log, "this node's launch does not match node 0's: world_size 4 here but 2 on node 0",
                    90)
        _fails_with(server.process, server.log_path, "a node was launched with another layout", 90)
    finally:
        stop_all(server, headless)


def test_torchrun_launch(tmp_path: Path, tp1_tokens) -> None:
    """torchrun's environment instead of flags: rank 0 serves (its engine process drives), rank 1 is the worker."""
    port, master = free_port(), free_port()
    log_path = tmp_path / "torchrun.log"
    with log_path.open("wb") as log:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(master),
             "-m", "dsv32.cli", "serve", TEST_MODEL, "--port", str(port), *BASE_ARGS, "-tp", "2"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    server = ServerProcess(launcher, f"http://127.0.0.1:{port}", log_path)
    try:
        assert wait_until_healthy(launcher, server.base_url, 120), server.log()[-3000:]
        assert complete(server) == tp1_tokens
        assert "model loaded on 2 ranks" in server.log()
        ranks = [int(c) for task in Path(f"/proc/{launcher.pid}/task").iterdir()
                 for c in (task / "children").read_text().split()]
        assert len(ranks) == 2
    finally:
        stop_all(server)
    for pid in ranks:
        assert wait_until_gone(pid, FAULT_DEADLINE_S), f"rank process {pid} outlived torchrun"
