"""Real `dsv32 serve` processes for the server tests: spawned on a free 127.0.0.1 port with the tiny model, waited
for until /health answers, and stopped with SIGTERM (killed only if that fails) when the test module ends."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

API_KEY = "test-key"
STARTUP_TIMEOUT_S = 180.0
# Small enough to keep CPU steps fast, large enough for the chat template's system prompt with tools.
BASE_ARGS = ("--max-model-len", "1024", "--max-num-batched-tokens", "512", "--dtype", "float32")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def engine_pid(self, timeout_s: float = 60.0) -> int:
        """The pid of the server's engine-core process (from its start-up log line)."""
        deadline = time.monotonic() + timeout_s
        while (found := re.search(r"engine core process (\d+) started", self.log())) is None:
            assert time.monotonic() < deadline, f"no engine core process was started; log:\n{self.log()[-3000:]}"
            time.sleep(0.1)
        return int(found.group(1))

    def metrics(self) -> dict[str, float]:
        """Prometheus samples by name (labels other than model_name/engine appended as {k=v})."""
        text = httpx.get(f"{self.base_url}/metrics", timeout=10).text
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                extra = {k: v for k, v in sample.labels.items() if k not in ("model_name", "engine")}
                suffix = "{" + ",".join(f"{k}={v}" for k, v in sorted(extra.items())) + "}" if extra else ""
                values[sample.name + suffix] = sample.value
        return values

    def wait_for_metrics(self, condition, timeout_s: float = 30.0) -> dict[str, float]:
        deadline = time.monotonic() + timeout_s
        while True:
            values = self.metrics()
            if condition(values) or time.monotonic() > deadline:
                return values
            time.sleep(0.2)

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, then wait; returns the exit code (kills and fails loudly if it does not stop)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"server ignored SIGTERM for {timeout_s}s; log:\n{self.log()[-3000:]}") from None
        return self.process.returncode


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def wait_until_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while process_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def spawn_server(log_dir: Path, *extra_args: str) -> ServerProcess:
    """Start `dsv32 serve` on a free port without waiting for it."""
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("DSV32_API_KEY", None)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "dsv32.cli", "serve", "--port", str(port), *BASE_ARGS, *extra_args],
            stdout=log, stderr=subprocess.STDOUT, env=env)
    return ServerProcess(process, f"http://127.0.0.1:{port}", log_path)


def start_server(log_dir: Path, *extra_args: str) -> ServerProcess:
    """Start `dsv32 serve` and wait until /health answers. A port taken by someone else between `free_port` and the
    server's bind (after its model loaded, seconds later) is retried once on a fresh port."""
    server = spawn_server(log_dir, *extra_args)
    healthy = wait_until_healthy(server.process, server.base_url, STARTUP_TIMEOUT_S)
    if not healthy and "address already in use" in server.log().lower():
        server = spawn_server(log_dir, *extra_args)
        healthy = wait_until_healthy(server.process, server.base_url, STARTUP_TIMEOUT_S)
    if not healthy:
        returncode = server.process.poll()
        server.stop()
        raise AssertionError(f"dsv32 serve did not become healthy (exit code {returncode}); log:\n"
                             f"{server.log()[-3000:]}")
    return server


def wait_until_healthy(process: subprocess.Popen, base_url: str, timeout_s: float) -> bool:
    """Poll ``/health`` until it answers 200 (True), or the process exits or ``timeout_s`` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while process.poll() is None and time.monotonic() < deadline:
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    return False


@pytest.fixture(scope="module")
def server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """Start servers with extra flags; every server started is stopped when the module ends."""
    started: list[ServerProcess] = []
    log_dir = tmp_path_factory.mktemp("dsv32-serve")

    def start(*extra_args: str) -> ServerProcess:
        server = start_server(log_dir, *extra_args)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
