#!/usr/bin/env python
"""Tensor-parallel scaling on the CPU: one process with every thread against the same threads split over ranks.

Layouts (each in a process of its own, one after the other, alone): TP=1 with ``--threads`` threads, TP=N with
``threads / N`` each (gloo), and TP=N with expert parallelism. For each, with greedy decoding and EOS ignored:

* prefill tok/s: ``--batch`` prompts of ``--prefill-len`` tokens, one output token each;
* decode tok/s: ``--batch`` prompts of 16 tokens, ``--output-len`` tokens each, minus the one-token run's time;
* collectives: the share of the driver's wall time spent in ``torch.distributed`` calls (the layers' all-reduces
  and all-gathers, and the broadcast of each step's call to the workers), measured by timing those calls.

Models: the built-in ``tiny`` preset (hidden 256: collectives dominate) and ``medium`` (hidden 1024, 8 layers,
32 experts: closer to where splitting the GEMMs pays). Both bf16 with dummy weights.

usage: tp_scaling.py [--models tiny medium] [--tp 2] [--threads 2] [--batch 8] [--out benchmarks/tp_scaling.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Result:
    model: str
    layout: str
    threads_per_rank: int
    prefill_tok_s: float
    decode_tok_s: float
    collective_share: float


def medium_config():  # noqa: ANN201 - ModelConfig, imported in the child only
    from dsv32.config import tiny_config

    return tiny_config().with_overrides(hidden_size=1024, intermediate_size=4096, moe_intermediate_size=512,
                                        num_hidden_layers=8, num_attention_heads=16, q_lora_rank=384,
                                        n_routed_experts=32, n_group=4, topk_group=2, num_experts_per_tok=4,
                                        index_n_heads=16)


class CollectiveClock:
    """Wall time spent inside ``torch.distributed``'s collectives in this process."""

    NAMES = ("all_reduce", "all_gather", "broadcast", "broadcast_object_list")

    def __init__(self) -> None:
        import torch.distributed as dist

        self.seconds = 0.0
        for name in self.NAMES:
            setattr(dist, name, self._timed(getattr(dist, name)))

    def _timed(self, fn):  # noqa: ANN001, ANN202
        def timed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


def run_child(args: argparse.Namespace) -> Result:
    import torch

    from dsv32 import LLM, SamplingParams
    from dsv32.config import tiny_config

    torch.set_num_threads(args.threads_per_rank)
    os.environ["OMP_NUM_THREADS"] = str(args.threads_per_rank)  # the workers' share
    clock = CollectiveClock()
    config = tiny_config() if args.model == "tiny" else medium_config()
    llm = LLM("tiny", model_config=config, dtype="bfloat16", tensor_parallel_size=args.tp,
              enable_expert_parallel=args.ep, enable_prefix_caching=False, max_num_seqs=args.batch,
              max_num_batched_tokens=max(2048, args.batch * args.prefill_len), max_model_len=2048)

    def timed(prompts: list[list[int]], max_tokens: int) -> float:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        start = time.perf_counter()
        llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return time.perf_counter() - start

    long = [[100 + (i * 7919 + j) % 100_000 for j in range(args.prefill_len)] for i in range(args.batch)]
    short = [p[:16] for p in long]
    timed(short, 4)  # warm-up
    clock.seconds = 0.0
    start = time.perf_counter()
    prefill = min(timed(long, 1) for _ in range(args.repeats))
    one = min(timed(short, 1) for _ in range(args.repeats))
    full = min(timed(short, args.output_len) for _ in range(args.repeats))
    share = clock.seconds / (time.perf_counter() - start)
    llm.engine.close()
    layout = f"TP={args.tp}" + (" + EP" if args.ep else "")
    return Result(args.model, layout, args.threads_per_rank, args.batch * args.prefill_len / prefill,
                  args.batch * (args.output_len - 1) / (full - one), share)


def measure(model: str, tp: int, ep: bool, threads: int, args: argparse.Namespace) -> Result:
    command = [sys.executable, os.path.abspath(__file__), "--child", "--model", model, "--tp-child", str(tp),
               "--threads-per-rank", str(threads), "--batch", str(args.batch), "--prefill-len", str(args.prefill_len),
               "--output-len", str(args.output_len), "--repeats", str(args.repeats)] + (["--ep"] if ep else [])
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return Result(**json.loads(out.strip().splitlines()[-1]))


def table(results: list[Result]) -> str:
    base = {r.model: r for r in results if r.layout == "TP=1"}
    lines = ["| model | layout | threads/rank | prefill tok/s | vs TP=1 | decode tok/s | vs TP=1 | in collectives |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        b = base[r.model]
        lines.append(f"| {r.model} | {r.layout} | {r.threads_per_rank} | {r.prefill_tok_s:.0f} | "
                     f"{r.prefill_tok_s / b.prefill_tok_s:.2f}x | {r.decode_tok_s:.1f} | "
                     f"{r.decode_tok_s / b.decode_tok_s:.2f}x | {100 * r.collective_share:.0f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "medium"], choices=["tiny", "medium"])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="threads of the TP=1 run, split over the ranks")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prefill-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the table (markdown) here too")
    # the child process
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="tiny", help=argparse.SUPPRESS)
    parser.add_argument("--tp-child", dest="tp_child", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--threads-per-rank", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--ep", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.tp = args.tp_child
        print(json.dumps(asdict(run_child(args))))
        return
    if args.threads % args.tp:
        sys.exit(f"--threads {args.threads} must split evenly over --tp {args.tp}")
    results = []
    for model in args.models:
        for tp, ep in ((1, False), (args.tp, False), (args.tp, True)):
            results.append(measure(model, tp, ep, args.threads // tp, args))
            print(f"{model} {results[-1].layout}: {results[-1]}", file=sys.stderr)
    text = table(results)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(f"# Tensor-parallel scaling on the CPU\n\nCommand: `python benchmarks/tp_scaling.py "
                     f"{' '.join(sys.argv[1:])}`, measured {time.strftime('%Y-%m-%d')} with the machine otherwise idle "
                     f"(batch {args.batch}, prefill {args.prefill_len} tokens, decode {args.output_len} tokens, bf16, "
                     f"best of {args.repeats}).\n\n{text}\n")


if __name__ == "__main__":
    main()
