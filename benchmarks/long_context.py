"""Long-context prefill and decode of dsv32, this checkout against another (the code before a change); writes
benchmarks/long_context.md.

The checkpoint (issue 26's): ../shared/peers/make_tiny_checkpoint.py --arch v32 --dtype bfloat16 --kv-lora-rank 512
--rope-dim 64 --index-heads 16 --index-head-dim 128 --index-topk 2048 (hidden 256, 4 layers, random weights, the real
tokenizer): the real model's top-2048, so contexts past 2K really are sparse.

Per context length L and checkout, in a process of its own (peak RSS is that process's): dsv32's ``LLM`` (bf16,
batch 1, prefix caching on, default chunked-prefill budget), after a warm-up generate, runs

1. a random L-token prompt, max_tokens=1: the cold prefill (prefill tok/s = L / its time);
2. the same prompt again, max_tokens=1 and max_tokens=33: both served from the prefix cache, so their difference is
   32 decode steps at context ~L (decode tok/s = 32 / the difference);

and reports its peak RSS (``ru_maxrss``). The runs are interleaved (for each L, each repeat: one checkout, then the
other) so a load change of the machine hits both alike; the table shows each figure's median over --repeats and its
spread (min-max). Contexts above --max-base-context run for this checkout only (the code before may take too long).

With ``--llama-cpp DIR`` (llama.cpp built by ``../shared/peers/setup_llama_cpp.sh``; built there if missing), the
same checkpoint converted to GGUF (bf16) is measured after dsv32, alone: ``llama-bench -p L -n 0`` (prefill) and
``llama-bench -p 0 -n 32 -d L`` (decode at depth L), ``--llama-repeats`` repetitions each; the report adds its
figures and the ratios, and ``--png`` plots tok/s against the context for both engines.

usage: python benchmarks/long_context.py --base /path/to/other/checkout [--contexts 1024 4096 16384 65536]
           [--repeats 3] [--threads 2] [--enforce-eager] [--work-dir DIR] [--output FILE]
           [--llama-cpp DIR [--llama-repeats 1] [--png FILE]]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUTPUT_MD = REPO / "benchmarks" / "long_context.md"
OUTPUT_PNG = REPO / "benchmarks" / "long_context.png"
CHECKPOINT_NAME = "tiny-v32-kv512-top2048-bf16"
CHECKPOINT_FLAGS = ("--arch", "v32", "--dtype", "bfloat16", "--kv-lora-rank", "512", "--rope-dim", "64",
                    "--index-heads", "16", "--index-head-dim", "128", "--index-topk", "2048")
DECODE_STEPS = 32
FIGURES = (("prefill_tps", "prefill tok/s"), ("decode_tps", "decode tok/s"), ("peak_rss_mb", "peak RSS MB"))


def worker(args: argparse.Namespace) -> None:
    """In its own process (``dsv32`` imported from ``--source``): one context length's figures, as a JSON line."""
    sys.path.insert(0, args.source)
    from dsv32 import LLM, SamplingParams

    llm = LLM(args.checkpoint, dtype="bfloat16", max_model_len=args.context + DECODE_STEPS + 64, max_num_seqs=1,
              enable_prefix_caching=True, enforce_eager=args.enforce_eager)
    rng = random.Random(args.seed)

    def timed(prompt: list[int], max_tokens: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        start = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == max_tokens
        return time.perf_counter() - start

    timed([rng.randrange(1000, 100000) for _ in range(64)], 4)  # warm-up
    prompt = [rng.randrange(1000, 100000) for _ in range(args.context)]
    prefill_s = timed(prompt, 1)
    first_s = timed(prompt, 1)
    decode_s = timed(prompt, DECODE_STEPS + 1) - first_s
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"prefill_tps": args.context / prefill_s, "prefill_s": prefill_s,
                      "decode_tps": DECODE_STEPS / decode_s, "peak_rss_mb": peak_rss_mb}), flush=True)


def run_worker(source: Path, checkpoint: Path, context: int, seed: int, args: argparse.Namespace) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(source))
    command = [sys.executable, __file__, "--worker", "--source", str(source), "--checkpoint", str(checkpoint),
               "--context", str(context), "--seed", str(seed)] + (["--enforce-eager"] if args.enforce_eager else [])
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"worker ({source}, context {context}) failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {source.name} L={context}: prefill {result['prefill_tps']:.0f} tok/s ({result['prefill_s']:.1f} s), "
          f"decode {result['decode_tps']:.1f} tok/s, peak RSS {result['peak_rss_mb']:.0f} MB "
          f"({time.perf_counter() - start:.0f} s in all)", flush=True)
    return result


def summary(values: list[float]) -> str:
    if not values:
        return "-"
    digits = 0 if statistics.median(values) >= 100 else 1
    spread = f" ({min(values):.{digits}f}-{max(values):.{digits}f})" if len(values) > 1 else ""
    return f"{statistics.median(values):.{digits}f}{spread}"


def llama_figures(llama_dir: Path, checkpoint: Path, contexts: list[int], args: argparse.Namespace,
                  busy: list[str]) -> dict[int, dict[str, list[float]]]:
    """llama.cpp's prefill and decode tok/s per context (every repetition's figure), on ``checkpoint`` in GGUF."""
    from benchmarks.serving import engine_turn
    from benchmarks.vs_llama_cpp import convert_to_gguf, ensure_llama, llama_bench

    ensure_llama(llama_dir, args.work_dir)
    gguf = convert_to_gguf(llama_dir, checkpoint, args.work_dir)
    lengths = ",".join(map(str, contexts))
    figures: dict[int, dict[str, list[float]]] = {context: {} for context in contexts}
    tests = {"prefill_tps": ("-p", lengths, "-n", "0"),
             "decode_tps": ("-p", "0", "-n", str(DECODE_STEPS), "-d", lengths)}
    for key, flags in tests.items():
        with engine_turn(f"llama.cpp {key.split('_')[0]}", args.threads, busy):
            records = llama_bench(llama_dir, gguf, args.threads, args.llama_repeats, args.work_dir / f"llama-{key}.log",
                                  *flags)
        for record in records:
            context = int(record["n_prompt"] if key == "prefill_tps" else record["n_depth"])
            figures[context][key] = [float(x) for x in record["samples_ts"]]
            print(f"  llama.cpp L={context}: {key} {statistics.median(figures[context][key]):.1f}", flush=True)
    return figures


def llama_lines(results: dict[tuple[str, int], list[dict[str, float]]], llama: dict[int, dict[str, list[float]]],
                contexts: list[int], args: argparse.Namespace) -> list[str]:
    """The report's section on llama.cpp: its figures beside this checkout's medians, and their ratios."""
    lines = ["", f"## Against llama.cpp (same checkpoint in GGUF bf16, `llama-bench -r {args.llama_repeats}`)", "",
             "| context | llama.cpp prefill tok/s | after | ratio | llama.cpp decode tok/s | after | ratio |",
             "|---|---|---|---|---|---|---|"]
    for context in contexts:
        runs = results.get(("after", context), [])
        cells = []
        for key, _ in FIGURES[:2]:
            theirs = llama.get(context, {}).get(key, [])
            ours = statistics.median(r[key] for r in runs) if runs else None
            ratio = f"{ours / statistics.median(theirs):.2f}x" if ours is not None and theirs else "-"
            cells += [summary(theirs), summary([ours]) if ours is not None else "-", ratio]
        lines.append(f"| {context} | " + " | ".join(cells) + " |")
    return lines


def plot(results: dict[tuple[str, int], list[dict[str, float]]], llama: dict[int, dict[str, list[float]]],
         contexts: list[int], path: Path) -> None:
    """tok/s against the context (log-log), prefill and decode side by side: this checkout, the other, llama.cpp."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (key, label) in zip(axes, FIGURES[:2], strict=False):
        series = {side: [(c, statistics.median(r[key] for r in results[(side, c)])) for c in contexts
                         if results.get((side, c))] for side in ("before", "after")}
        series["llama.cpp"] = [(c, statistics.median(llama[c][key])) for c in contexts if llama.get(c, {}).get(key)]
        for name, points in series.items():
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label="dsv32 " + name if name != "llama.cpp" else name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("Long context, batch 1 (tiny V3.2, index_topk 2048, 2 threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(results: dict[tuple[str, int], list[dict[str, float]]], contexts: list[int],
           args: argparse.Namespace, machine: str, commits: dict[str, str], load: list[str]) -> str:
    lines = [
        "# Long context: prefill and decode against the context length",
        "",
        f"{datetime.now():%Y-%m-%d %H:%M}, {machine}, {args.threads} threads"
        f"{', eager (no captured decode graphs)' if args.enforce_eager else ''}; written by "
        "`benchmarks/long_context.py` (its docstring says what is measured). Checkpoint: tiny V3.2 (hidden 256, "
        "4 layers, kv_lora 512, rope 64, indexer 16 x 128, **index_topk 2048**), bf16, batch 1.",
        "",
        f"- before: {commits['before']}; after: {commits['after']}.",
        "- median of the runs per cell, spread (min-max) in brackets; before and after interleaved, each run its "
        "own process.",
        *load,
        "",
        "| context | | runs | prefill tok/s | decode tok/s | peak RSS MB |",
        "|---|---|---|---|---|---|",
    ]
    for context in contexts:
        for side in ("before", "after"):
            runs = results.get((side, context), [])
            if runs:
                cells = [summary([r[key] for r in runs]) for key, _ in FIGURES]
                lines.append(f"| {context} | {side} | {len(runs)} | " + " | ".join(cells) + " |")
    lines.append("")
    for side in ("before", "after"):
        def median(key: str, context: int, side: str = side) -> float | None:
            runs = results.get((side, context), [])
            return statistics.median(r[key] for r in runs) if runs else None

        base = contexts[0]
        ratios = []
        for context in contexts[1:]:
            prefill, decode = median("prefill_tps", context), median("decode_tps", context)
            rss, base_rss = median("peak_rss_mb", context), median("peak_rss_mb", base)
            if prefill is None or decode is None or rss is None or base_rss is None:
                continue
            ratios.append(f"{context}: prefill {prefill / median('prefill_tps', base):.3f}x, decode "
                          f"{decode / median('decode_tps', base):.2f}x, RSS +{rss - base_rss:.0f} MB")
        if ratios:
            lines.append(f"- {side}, against {base} tokens: " + "; ".join(ratios) + ".")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, help="the other checkout (the code before)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--max-base-context", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/dsv32-long-context"))
    parser.add_argument("--output", type=Path, default=OUTPUT_MD)
    parser.add_argument("--llama-cpp", type=Path, help="llama.cpp's directory (setup_llama_cpp.sh DEST)")
    parser.add_argument("--llama-repeats", type=int, default=1)
    parser.add_argument("--png", type=Path, default=OUTPUT_PNG)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--context", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.base is None or not (args.base / "dsv32").is_dir():
        raise SystemExit("--base must name a checkout of dsv32 (a directory holding dsv32/)")
    sys.path.insert(0, str(REPO))
    from benchmarks.serving import checkout_description, engine_turn, load_lines, machine_description, make_checkpoint

    args.work_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = make_checkpoint(args.work_dir, CHECKPOINT_NAME, CHECKPOINT_FLAGS)
    sources = {"before": args.base.resolve(), "after": REPO}
    base_commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=args.base, capture_output=True,
                                 text=True, check=False).stdout.strip() or str(args.base)
    commits = {"before": base_commit, "after": checkout_description()}
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    busy: list[str] = []
    for context in args.contexts:
        for repeat in range(args.repeats):
            for side, source in sources.items():
                if side == "before" and context > args.max_base_context:
                    continue
                with engine_turn(f"{side} at {context} tokens (repeat {repeat + 1})", args.threads, busy):
                    result = run_worker(source, checkpoint, context, seed=1000 * repeat + context, args=args)
                results.setdefault((side, context), []).append(result)
        text = report(results, args.contexts, args, machine_description(args.threads), commits, load_lines(busy))
        args.output.write_text(text)  # after every context: a cut-off run still leaves its figures
    if args.llama_cpp is not None:
        llama = llama_figures(args.llama_cpp.resolve(), checkpoint, args.contexts, args, busy)
        text = report(results, args.contexts, args, machine_description(args.threads), commits, load_lines(busy))
        text += "\n".join(llama_lines(results, llama, args.contexts, args)) + "\n"
        args.output.write_text(text)
        plot(results, llama, args.contexts, args.png)
    print(text)


if __name__ == "__main__":
    main()
