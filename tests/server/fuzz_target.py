"""A `dsv32 serve` under fuzzing: sends hostile requests, judges each answer by ``hostile.contract_violation``, checks
the server is still alive after them (``/health`` 200 and a plain chat completion answered) and, when it is not,
records that and starts a fresh server so the next input is judged on its own.

Used by test_adversarial.py and test_fuzz_openapi.py. Every request has a timeout, so a hung server fails a test
instead of hanging the suite.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import httpx

from tests.server.conftest import API_KEY, ServerProcess, process_alive, start_server, wait_until_gone
from tests.server.hostile import Hostile, chat_body, contract_violation

AUTH = {"Authorization": f"Bearer {API_KEY}"}
# A server that dies more than this many times in one test ends that test's run (each death costs a restart).
MAX_RESTARTS = int(os.environ.get("DSV32_FUZZ_MAX_RESTARTS", "2"))
# Extra seconds past a case's time limit before its request is given up as a hang.
HANG_GRACE_S = 3.0
_EXCEPTION_LINE = re.compile(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception|Exit|Interrupt)\b.*)$", re.MULTILINE)


class ServerDied(Exception):
    """The server stopped serving more often than MAX_RESTARTS allows."""


class FuzzTarget:
    """One live `dsv32 serve` (restarted when a hostile input takes it down)."""

    def __init__(self, log_dir: Path, *extra_args: str) -> None:
        self.log_dir = log_dir
        self.extra_args = ("--api-key", API_KEY, *extra_args)
        self.restarts = 0
        self.exhausted = False
        self._start()

    def _start(self) -> None:
        self.server: ServerProcess = start_server(self.log_dir, *self.extra_args)
        self.engine_pid = self.server.engine_pid()
        # No keep-alive: a hostile input that makes the server drop its connection must not fail the next one.
        self.client = httpx.Client(base_url=self.server.base_url, headers=AUTH,
                                   limits=httpx.Limits(max_keepalive_connections=0))

    def begin(self) -> None:
        """A new test: a fresh restart budget, and a live server (a fresh one if the last test left it dead)."""
        self.restarts = 0
        self.exhausted = False
        if self.server.process.poll() is not None or self.liveness_problem() is not None:
            self.client.close()
            self.stop()
            self._start()

    @property
    def base_url(self) -> str:
        return self.server.base_url

    # ---------------------------------------------------------------------------------------------------------------

    def send(self, case: Hostile) -> str | None:
        """Send ``case``; None when its answer keeps the contract, else what broke (with the server's own error)."""
        log_offset = self._log_size()
        started = time.monotonic()
        status, body, error = None, b"", None
        try:
            response = self.client.post(case.path, content=case.body,
                                        headers={"Content-Type": "application/json"},
                                        timeout=case.max_seconds + HANG_GRACE_S)
            status, body = response.status_code, response.content
        except httpx.TimeoutException:
            error = f"no answer within {case.max_seconds + HANG_GRACE_S:.1f}s (hang)"
        except httpx.HTTPError as exc:
            error = f"connection failed: {type(exc).__name__}: {exc}"
        problem = contract_violation(case, status, body, time.monotonic() - started, error)
        if problem is not None:
            logged = self.logged_exception(log_offset)
            if logged:
                problem += f" [server log: {logged}]"
        return problem

    def liveness_problem(self) -> str | None:
        """None when /health is 200 and a plain chat completion is answered, else what failed."""
        if self.server.process.poll() is not None:
            return f"exited with {self.server.process.returncode}"
        if not process_alive(self.engine_pid):
            return f"lost its engine core process (pid {self.engine_pid})"
        try:
            health = self.client.get("/health", timeout=3)
            if health.status_code != 200:
                return f"answers /health with {health.status_code}"
            chat = self.client.post("/v1/chat/completions", json=chat_body(), timeout=5)
            if chat.status_code != 200:
                return f"answers a plain chat completion with {chat.status_code}: {chat.text[:200]}"
        except httpx.TimeoutException as exc:
            return f"does not answer ({type(exc).__name__}: {exc.request.url.path} hangs)"
        except httpx.HTTPError as exc:
            return f"does not answer ({type(exc).__name__}: {exc})"
        return None

    def check_alive(self, after: str) -> str | None:
        """None when the server is alive, else a failure line; a dead server is replaced by a fresh one."""
        problem = self.liveness_problem()
        if problem is None:
            return None
        logged = self.logged_exception(0)
        line = f"after {after}: the server {problem}" + (f" [server log: {logged}]" if logged else "")
        self.restart()
        return line

    def run(self, cases, failures: list[str]) -> None:
        """Send every case, appending a line per broken contract (and per server death) to ``failures``."""
        if self.exhausted:
            return
        try:
            for case in cases:
                problem = self.send(case)
                if problem is None:
                    continue
                failures.append(f"{case.short()} -> {problem}")
                death = self.check_alive(case.short())
                if death is not None:
                    failures.append(f"    {death}")
        except ServerDied as exc:
            self.exhausted = True
            failures.append(f"STOPPED, the remaining inputs of this test were not sent: {exc}")

    def finish(self, what: str, failures: list[str]) -> None:
        """The end of a batch: the server must be alive and idle (no request left running, no KV block held)."""
        if self.exhausted:
            return
        try:
            death = self.check_alive(f"all {what}")
        except ServerDied as exc:
            death = str(exc)
        if death is not None:
            failures.append(death)
            return
        idle = self.idle_problem()
        if idle is not None:
            failures.append(f"after all {what}: the engine is {idle}")

    # ---------------------------------------------------------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        return self.server.metrics()

    def idle_problem(self, timeout_s: float = 10.0) -> str | None:
        """None once no request runs or waits and no KV block is held, else the gauges still up after the wait."""
        keys = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")
        try:
            values = self.server.wait_for_metrics(lambda m: all(m.get(k, 0.0) == 0.0 for k in keys), timeout_s)
        except httpx.HTTPError as exc:
            return f"/metrics does not answer ({type(exc).__name__})"
        busy = {k: values.get(k) for k in keys if values.get(k, 0.0) != 0.0}
        return None if not busy else f"still busy {timeout_s:.0f}s later: {busy}"

    def logged_exception(self, offset: int) -> str | None:
        """The last exception line the server logged after byte ``offset`` of its log."""
        try:
            with self.server.log_path.open("rb") as log:
                log.seek(offset)
                text = log.read().decode(errors="replace")
        except OSError:
            return None
        found = _EXCEPTION_LINE.findall(text)
        return found[-1][:200] if found else None

    def _log_size(self) -> int:
        try:
            return self.server.log_path.stat().st_size
        except OSError:
            return 0

    def restart(self) -> None:
        self.restarts += 1
        self.client.close()
        self.stop()
        self._start()
        if self.restarts > MAX_RESTARTS:
            raise ServerDied(f"the server died {self.restarts} times in this test (DSV32_FUZZ_MAX_RESTARTS="
                             f"{MAX_RESTARTS} restarts allowed)")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL (the engine core too) if a hung server ignores it for a few seconds."""
        process = self.server.process
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=5)
            except Exception:
                process.kill()
                process.wait()
        if not wait_until_gone(self.engine_pid, 5):
            os.kill(self.engine_pid, signal.SIGKILL)
            wait_until_gone(self.engine_pid, 5)


def failure_report(title: str, failures: list[str], limit: int = 80) -> str:
    lines = failures[:limit] + ([f"... and {len(failures) - limit} more"] if len(failures) > limit else [])
    return f"{title}: {sum(not f.startswith('    ') for f in failures)} broken contract(s)\n" + "\n".join(lines)


def dump(obj) -> str:
    return json.dumps(obj, ensure_ascii=True)[:300]
