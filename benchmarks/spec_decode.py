#!/usr/bin/env python
"""Speculative decoding (MTP): output tokens/s, engine steps and acceptance length at batch 1 and 8, k = 0..3.

Two drafters per k:

* ``oracle``: proposes the true greedy continuation (taken from a k = 0 run), so every draft is accepted: the
  ceiling of our verify path (one main-model forward over 1 + k rows, sequential exact verification, bookkeeping).
  Steps fall by (k + 1)x; whether tokens/s rises depends on how much more a (1 + k)-row forward costs than a 1-row
  one, which on a CPU is far from free.
* ``mtp``: the checkpoint's own MTP layer. On the built-in ``tiny`` model (random weights) its drafts are noise and
  almost never accepted, so this row measures the drafter's overhead only.

What needs a trained checkpoint and a GPU to mean anything: the MTP acceptance length (DeepSeek-V3.2's MTP layer
reaches about 2.5 tokens per step at k = 1..3 on real text, per the SGLang numbers) and any speed-up: on a GPU a
decode step is memory-bound, so verifying 1 + k rows costs about as much as 1 row, and the tokens/s gain approaches
the acceptance length. On this CPU the forward cost grows with the rows, so even the oracle gains little.

usage: spec_decode.py [--checkpoint DIR] [--batch-sizes 1 8] [--ks 0 1 2 3] [--input-len 64] [--output-len 32]
                      [--json FILE]
Greedy decoding, EOS ignored, prefix caching off; float32. Every run checks its tokens equal the k = 0 run's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass

# Run from a checkout: the repository root, not this folder, is where ``dsv32`` lives.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsv32 import LLM, SamplingParams  # noqa: E402
from dsv32.engine.spec_decode import MTPProposer, OracleProposer  # noqa: E402


@dataclass
class Row:
    drafter: str
    batch_size: int
    k: int
    tokens_per_s: float
    steps: int
    acceptance_length: float  # tokens per sequence per verify step (1 + accepted / drafts); 1.0 without drafts
    seconds: float
    same_tokens: bool


def random_prompts(batch_size: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 100_000) for _ in range(length)] for _ in range(batch_size)]


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> tuple[list[list[int]], int, float]:
    """Generate through the engine core, counting steps; returns (tokens per prompt, steps, seconds)."""
    core = llm.engine
    ids = [f"bench-{i}" for i in range(len(prompts))]
    start = time.perf_counter()
    for request_id, prompt in zip(ids, prompts, strict=True):
        core.add_request(request_id, prompt, params, stream=False)
    finished, steps = {}, 0
    while core.has_unfinished_requests():
        steps += 1
        finished.update((out.request_id, out.outputs[0].token_ids) for out in core.step())
    return [finished[i] for i in ids], steps, time.perf_counter() - start


def acceptance(llm: LLM, before: tuple[int, int]) -> float:
    spec = llm.engine.stats().spec_decode
    if spec is None:
        return 1.0
    drafts, accepted = spec.num_drafts - before[0], spec.num_accepted_tokens - before[1]
    return 1.0 + accepted / drafts if drafts else 1.0


def counters(llm: LLM) -> tuple[int, int]:
    spec = llm.engine.stats().spec_decode
    return (spec.num_drafts, spec.num_accepted_tokens) if spec else (0, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="tiny", help="HF checkpoint folder with an MTP layer (default tiny)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--ks", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()

    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    common = dict(dtype="float32", device="cpu", enable_prefix_caching=False, max_num_seqs=max(args.batch_sizes),
                  max_model_len=args.input_len + args.output_len + 8, max_num_batched_tokens=2048)
    engines = {k: LLM(args.checkpoint, **common, **({"speculative_config": {"num_speculative_tokens": k}} if k else {}))
               for k in args.ks}
    vocab = engines[args.ks[0]].engine.model_config.vocab_size
    warm = random_prompts(1, args.input_len, seed=99)
    for llm in engines.values():
        run(llm, warm, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))

    rows: list[Row] = []
    for batch_size in args.batch_sizes:
        prompts = random_prompts(batch_size, args.input_len, seed=batch_size)
        reference = None
        for k in args.ks:
            llm = engines[k]
            drafters = ["none"] if k == 0 else ["oracle", "mtp"]
            for drafter in drafters:
                if drafter == "oracle":
                    truth = {tuple(p): out for p, out in zip(prompts, reference, strict=True)}
                    llm.engine.runner.proposer = OracleProposer(k, truth, vocab)
                elif drafter == "mtp":
                    llm.engine.runner.proposer = MTPProposer(k)
                before = counters(llm)
                tokens, steps, seconds = run(llm, prompts, params)
                if reference is None:
                    reference = tokens
                total = sum(len(t) for t in tokens)
                rows.append(Row(drafter, batch_size, k, total / seconds, steps, acceptance(llm, before), seconds,
                                tokens == reference))
                r = rows[-1]
                print(f"batch {batch_size:2d}  k={k}  {drafter:6s}  {r.tokens_per_s:8.1f} tok/s  {steps:4d} steps  "
                      f"acceptance length {r.acceptance_length:.2f}  same tokens: {r.same_tokens}", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump([asdict(r) for r in rows], fh, indent=1)


if __name__ == "__main__":
    main()
