#!/usr/bin/env python
"""Offline generation throughput: our ``LLM.generate`` against HF transformers' ``generate``, in one run.

Both get the same tiny DeepSeek-V3.2 checkpoint (HF's own classes wrote it), the same random prompts, greedy
decoding of exactly ``--output-len`` new tokens (EOS ignored), in the same process and thread count. Prefix caching
is off so repeated runs get no help. Prints output tokens/s of each and the ratio per batch size.

usage: offline_throughput.py [--checkpoint DIR] [--batch-sizes 1 8 16] [--input-len 128] [--output-len 32]
Without --checkpoint, one is written to a temporary folder with the peers' make_tiny_checkpoint.py (bf16).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

DEFAULT_CHECKPOINT_MAKER = "/work/shared/peers/make_tiny_checkpoint.py"
# Run from a checkout: the repository root, not this folder, is where ``dsv32`` lives.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class Row:
    batch_size: int
    ours_tokens_per_s: float
    hf_tokens_per_s: float
    ratio: float
    ours_s: float
    hf_s: float
    # Greedy tokens of both engines agree up to the first divergence: the mean length of that common prefix as a
    # fraction of the output (1.0 = identical; in bf16 rounding near-ties flip some tokens, fp32 agrees fully).
    greedy_agreement: float


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def make_checkpoint(maker: str, out: str) -> None:
    if not os.path.isfile(maker):
        sys.exit(f"no --checkpoint given and the checkpoint maker {maker} does not exist; pass --checkpoint DIR")
    subprocess.run([sys.executable, maker, out, "--arch", "v32", "--dtype", "bfloat16"], check=True,
                   stdout=subprocess.DEVNULL)


def random_prompts(batch_size: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 100_000) for _ in range(length)] for _ in range(batch_size)]


def run_ours(llm, prompts: list[list[int]], output_len: int) -> tuple[float, list[list[int]]]:
    from dsv32 import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == output_len for o in outs)
    return elapsed, [o.outputs[0].token_ids for o in outs]


@torch.inference_mode()
def run_hf(model, prompts: list[list[int]], output_len: int) -> tuple[float, list[list[int]]]:
    input_ids = torch.tensor(prompts, dtype=torch.long)  # equal lengths: no padding
    start = time.perf_counter()
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                         max_new_tokens=output_len, min_new_tokens=output_len, pad_token_id=0)
    elapsed = time.perf_counter() - start
    generated = out[:, input_ids.shape[1]:]
    assert generated.shape == (len(prompts), output_len)
    return elapsed, generated.tolist()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="tiny V3.2 HF checkpoint folder (default: write one to a temp folder)")
    p.add_argument("--make-checkpoint", default=DEFAULT_CHECKPOINT_MAKER, help="script that writes it")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--device", default="cpu", help="cpu or cuda (both engines run there)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per engine and batch size (best is kept)")
    p.add_argument("--threads", type=int, help="torch CPU threads for both (default: torch's choice)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="dsv32-bench-") as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = os.path.join(tmp, "tiny-v32-bf16")
            make_checkpoint(args.make_checkpoint, checkpoint)
        rows = bench(checkpoint, args)

    print(f"\nthroughput (output tokens/s), input {args.input_len}, output {args.output_len}, {args.dtype}, "
          f"{args.device}, {torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"{'batch':>5} {'dsv32 tok/s':>12} {'HF tok/s':>10} {'ratio':>7} {'dsv32 s':>8} {'HF s':>8} {'same':>6}")
    for r in rows:
        print(f"{r.batch_size:>5} {r.ours_tokens_per_s:>12.1f} {r.hf_tokens_per_s:>10.1f} {r.ratio:>6.2f}x "
              f"{r.ours_s:>8.3f} {r.hf_s:>8.3f} {r.greedy_agreement:>6.0%}")
    print("same: mean share of each output that both engines generated identically (up to the first divergence)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"args": vars(args), "rows": [asdict(r) for r in rows]}, fh, indent=2)


def bench(checkpoint: str, args: argparse.Namespace) -> list[Row]:
    from transformers import AutoModelForCausalLM

    from dsv32 import LLM

    dtype = getattr(torch, args.dtype)
    max_batch = max(args.batch_sizes)
    total_len = args.input_len + args.output_len
    llm = LLM(checkpoint, dtype=args.dtype, device=args.device, max_model_len=total_len + 64,
              max_num_seqs=max(max_batch, 8), max_num_batched_tokens=max(2048, max_batch * args.input_len),
              enable_prefix_caching=False)
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).to(args.device).eval()

    rows = []
    for batch_size in args.batch_sizes:
        run_ours(llm, random_prompts(batch_size, args.input_len, seed=-batch_size), 4)  # warm-up
        run_hf(hf, random_prompts(batch_size, args.input_len, seed=-batch_size), 4)
        ours_s = hf_s = float("inf")
        agree = 0.0
        for repeat in range(args.repeats):
            prompts = random_prompts(batch_size, args.input_len, seed=1000 * batch_size + repeat)
            t_ours, tokens_ours = run_ours(llm, prompts, args.output_len)
            t_hf, tokens_hf = run_hf(hf, prompts, args.output_len)
            ours_s, hf_s = min(ours_s, t_ours), min(hf_s, t_hf)
            agree = sum(common_prefix(a, b) for a, b in zip(tokens_ours, tokens_hf, strict=True)) / (
                batch_size * args.output_len)
        generated = batch_size * args.output_len
        rows.append(Row(batch_size, generated / ours_s, generated / hf_s, hf_s / ours_s, ours_s, hf_s, agree))
        print(f"batch {batch_size}: dsv32 {generated / ours_s:.1f} tok/s, HF {generated / hf_s:.1f} tok/s, "
              f"ratio {hf_s / ours_s:.2f}x", flush=True)
    return rows


if __name__ == "__main__":
    main()
