"""What the side-by-side serving benchmarks share (``vs_vllm_cpu.py``, ``vs_llama_cpp.py``): starting a server in a
process group of its own and stopping it, the machine-load check before each engine starts, and vLLM's own
``vllm bench serve`` run against an OpenAI-compatible server.

A module of helpers, not a script: the benchmark scripts import it (``from benchmarks.serving import ...``, with the
repository root on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
# ../shared/peers next to the checkout (a worktree may sit one level deeper).
PEERS = next((p / "shared" / "peers" for p in REPO.parents if (p / "shared" / "peers").is_dir()),
             REPO.parent / "shared" / "peers")
MODEL_NAME = "tiny"
INPUT_LEN = 128
OUTPUT_LEN = 32
# dsv32 compiles its decode graphs at start-up (torch.compile, 20-100 s on 2 cores) unless told to run eagerly.
STARTUP_TIMEOUT_S = 600
# A machine is "busy" when its 1-minute load average exceeds this share of its cores (before an engine starts).
BUSY_LOAD_PER_CORE = 0.25


class BenchmarkError(Exception):
    """A step that cannot go on; the message says which and where its log is."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_step(command: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    """Run a command to completion, its output in `log`; a non-zero exit is a BenchmarkError."""
    with log.open("w") as out:
        code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if code != 0:
        raise BenchmarkError(f"`{' '.join(command[:3])} ...` exited with {code}; see {log}")


def clean_env(**overrides: str) -> dict[str, str]:
    """This environment without thread-count overrides (so each engine picks its own), plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return {**env, **overrides}


def machine_load(cores: int) -> str | None:
    """A warning when the machine is not idle (other work would slow whichever engine runs now), else None."""
    load = os.getloadavg()[0]
    if load > BUSY_LOAD_PER_CORE * cores:
        return f"load average {load:.2f} on {cores} cores"
    return None


def note_machine_load(name: str, cores: int, busy: list[str]) -> None:
    """Check the load before ``name`` starts: warn, and add a line to ``busy`` (the report's load line), if busy."""
    load = machine_load(cores)
    if load:
        print(f"warning: the machine is not idle before {name} starts ({load}): its figures are handicapped")
        busy.append(f"{name}: {load}")


@dataclass(frozen=True)
class ServerSpec:
    """How to launch one server: its name in the report, command line and environment."""

    name: str
    command: list[str]
    env: dict[str, str]


class RunningServer:
    """A server process in its own session, stopped (by its process group id) when the block ends; the block starts
    once ``GET /v1/models`` answers 200."""

    def __init__(self, spec: ServerSpec, port: int, log: Path) -> None:
        self.spec, self.port, self.log = spec, port, log
        self._out = log.open("w")
        self.process = subprocess.Popen(
            spec.command, stdout=self._out, stderr=subprocess.STDOUT, env=spec.env, cwd=REPO, start_new_session=True
        )

    def __enter__(self) -> RunningServer:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchmarkError(f"{self.spec.name} exited with {self.process.returncode} at start; see {self.log}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/v1/models", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(1.0)
        self.stop()
        raise BenchmarkError(f"{self.spec.name} did not answer within {STARTUP_TIMEOUT_S} s; see {self.log}")

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._out.close()


def vllm_bench(python: Path, checkpoint: Path, port: int, concurrency: int, num_prompts: int, result: Path,
               detailed: bool = False) -> dict:
    """vLLM's own `bench serve` (random INPUT_LEN in / OUTPUT_LEN out, --ignore-eos) against 127.0.0.1:port; returns
    its saved result JSON (``detailed``: with every request's error message, under ``errors``)."""
    command = [str(python), str(PEERS / "vllm_cli.py"), "bench", "serve", "--backend", "vllm"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--model", MODEL_NAME, "--tokenizer", str(checkpoint)]
    command += ["--dataset-name", "random", "--random-input-len", str(INPUT_LEN)]
    command += ["--random-output-len", str(OUTPUT_LEN)]
    command += ["--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency), "--ignore-eos"]
    command += ["--save-result", "--result-dir", str(result.parent), "--result-filename", result.name]
    if detailed:
        command.append("--save-detailed")
    run_step(command, result.with_suffix(".log"))
    return json.loads(result.read_text())


def ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}x" if theirs else "n/a"
