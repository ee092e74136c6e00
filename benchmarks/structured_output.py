#!/usr/bin/env python
"""Structured outputs cost: grammar compile time (first and cached), the per-step mask cost at batch 1 and 8, and
the throughput of unconstrained requests with the feature loaded vs not.

* Compile: the backend load (xgrammar import + tokenizer info over the 129280-token vocabulary) once, then each
  spec's first compile and a second, cached one, through the engine's ``StructuredOutputManager``.
* Mask: one step's ``fill_bitmask`` (every constrained row's matcher writes its allowed tokens) plus applying it to
  ``[batch, 129280]`` float32 logits, with the matchers walked through their grammar by random allowed tokens so
  the states are the ones a generation visits. Median per step.
* Hooks: what the engine's structured-output hooks cost a step of 8 unconstrained rows once the backend is loaded.
* Throughput: two identical engines (tiny model, greedy, ``--output-len`` tokens per request, EOS ignored, prefix
  caching off); in one the structured-outputs backend was never loaded, in the other it is loaded and has served
  constrained requests. The same unconstrained batch runs on each in turn (order alternating), ``--repeats``
  times; medians and the per-round ratio reported.

usage: structured_output.py [--batch 8] [--output-len 32] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

import torch

# Run from a checkout: the repository root, not this folder, is where ``dsv32`` lives.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsv32 import LLM, SamplingParams  # noqa: E402
from dsv32.encoding import prepare_chat_request  # noqa: E402
from dsv32.engine.request import TokenSequence  # noqa: E402
from dsv32.engine.sampling_params import StructuredOutputsParams  # noqa: E402
from dsv32.engine.structured_output import StructuredOutputManager  # noqa: E402

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {
    "type": "integer", "minimum": 0, "maximum": 150}, "email": {"type": "string", "format": "email"}, "tags": {
    "type": "array", "items": {"type": "string"}, "maxItems": 5}}, "required": ["name", "age"]}
ORDER = {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{6}$"}, "items": {
    "type": "array", "items": {"type": "object", "properties": {"sku": {"type": "string"}, "qty": {
        "type": "integer", "minimum": 1}, "price": {"type": "number"}}, "required": ["sku", "qty"]}}, "status": {
    "enum": ["open", "paid", "shipped"]}, "notes": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
    "required": ["id", "items", "status"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer", "minimum": 1, "maximum": 14}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {
        "query": {"type": "string"}, "limit": {"type": "integer"}}, "required": ["query"]}}}]


def specs() -> dict[str, StructuredOutputsParams]:
    tag = prepare_chat_request([{"role": "user", "content": "hi"}], tools=TOOLS,
                               tool_choice="required").tool_call_structural_tag()
    return {
        "json_schema_person": StructuredOutputsParams(json=PERSON),
        "json_schema_order": StructuredOutputsParams(json=ORDER),
        "json_object": StructuredOutputsParams(json_object=True),
        "regex": StructuredOutputsParams(regex=r"[A-Z][a-z]+ \d{1,3} (yes|no)"),
        "choice": StructuredOutputsParams(choice=["positive", "negative", "neutral"]),
        "dsml_tool_calls_2_tools": StructuredOutputsParams(structural_tag=tag),
    }


def measure_compile(manager: StructuredOutputManager) -> dict[str, object]:
    start = time.perf_counter()
    _ = manager.backend
    result: dict[str, object] = {"backend_load_s": time.perf_counter() - start, "specs": {}}
    for name, spec in specs().items():
        start = time.perf_counter()
        manager.compile(spec).result()
        first = time.perf_counter() - start
        start = time.perf_counter()
        manager.compile(spec).result()
        cached = time.perf_counter() - start
        result["specs"][name] = {"first_ms": first * 1e3, "cached_ms": cached * 1e3}
    return result


def measure_mask(manager: StructuredOutputManager, batch: int, steps: int, seed: int) -> dict[str, float]:
    """Median ms per step of fill_bitmask + apply, rows cycling through the specs, random allowed tokens."""
    rng = random.Random(seed)
    all_specs = list(specs().values())
    vocab = manager.backend.vocab_size
    seqs: list[TokenSequence] = []

    def new_seq(i: int) -> TokenSequence:
        params = SamplingParams(structured_outputs=all_specs[i % len(all_specs)])
        seq = TokenSequence(f"bench-{i}", 0, [0, 1000], params, max_tokens=10_000)
        manager.add(seq)
        return seq

    seqs = [new_seq(i) for i in range(batch)]
    for spec in all_specs:
        manager.compile(spec).result()
    manager.poll()
    fill_ms, apply_ms = [], []
    logits = torch.zeros(batch, vocab)
    for step in range(steps):
        logits.normal_()
        start = time.perf_counter()
        mask = manager.fill_bitmask(seqs)
        filled = time.perf_counter()
        masked = mask.apply(logits)
        applied = time.perf_counter()
        fill_ms.append((filled - start) * 1e3)
        apply_ms.append((applied - filled) * 1e3)
        for row, seq in enumerate(seqs):
            allowed = torch.isfinite(masked[row]).nonzero().view(-1).tolist()
            token = rng.choice(allowed)
            if manager.accept(seq, token) or token == 1:  # grammar complete: start a fresh sequence in its row
                manager.remove(seq)
                seqs[row] = new_seq(batch * (step + 1) + row)
                manager.compile(seqs[row].sampling_params.structured_outputs).result()
                manager.poll()
    for seq in seqs:
        manager.remove(seq)
    return {"fill_ms": statistics.median(fill_ms), "apply_ms": statistics.median(apply_ms),
            "step_ms": statistics.median(f + a for f, a in zip(fill_ms, apply_ms, strict=True))}


def hook_overhead_us(manager: StructuredOutputManager, batch: int, steps: int = 2000) -> float:
    """Median microseconds per step that the engine's structured-output hooks (poll, fill_bitmask, one accept per
    row) cost a batch of unconstrained sequences while the backend is loaded and a constrained sequence is alive."""
    alive = TokenSequence("alive", 0, [0, 1000], SamplingParams(structured_outputs=StructuredOutputsParams(regex="a+")),
                     max_tokens=10)
    manager.add(alive)
    manager.compile(alive.sampling_params.structured_outputs).result()
    manager.poll()
    seqs = [TokenSequence(f"free-{i}", 0, [0, 1000], SamplingParams(), max_tokens=10) for i in range(batch)]
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        manager.poll()
        assert manager.fill_bitmask(seqs) is None
        for seq in seqs:
            manager.accept(seq, 1000)
        times.append(time.perf_counter() - start)
    manager.remove(alive)
    return statistics.median(times) * 1e6


def unconstrained_tps(llm: LLM, batch: int, output_len: int, seed: int) -> float:
    rng = random.Random(seed)
    prompts = [{"prompt_token_ids": [rng.randrange(100, 100_000) for _ in range(32)]} for _ in range(batch)]
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="unconstrained throughput batch (default 8)")
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mask-steps", type=int, default=200)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()

    engine_kwargs = {"dtype": "float32", "device": "cpu", "max_model_len": 512, "enable_prefix_caching": False,
                     "max_num_seqs": max(8, args.batch)}
    without = LLM("tiny", **engine_kwargs)
    loaded = LLM("tiny", **engine_kwargs)
    manager = loaded.engine.structured_output
    results: dict[str, object] = {"compile": measure_compile(manager)}
    results["mask"] = {f"batch_{b}": measure_mask(manager, b, args.mask_steps, seed=b) for b in (1, 8)}
    results["hook_overhead_us_unconstrained_batch_8"] = hook_overhead_us(manager, 8)
    # The loaded engine serves constrained requests first, so its matchers and caches have been used.
    loaded.generate(["x"] * 4, [SamplingParams(max_tokens=8, seed=i, structured_outputs=spec)
                                for i, spec in enumerate(list(specs().values())[:4])], use_tqdm=False)
    assert not without.engine.structured_output.loaded and manager.loaded
    rounds: dict[str, list[float]] = {"not_loaded": [], "loaded": []}
    engines = {"not_loaded": without, "loaded": loaded}
    for repeat in range(args.repeats):
        # Each round runs both engines back to back, in alternating order, so drifting machine load hits both.
        for key in sorted(engines, reverse=repeat % 2 == 1):
            rounds[key].append(unconstrained_tps(engines[key], args.batch, args.output_len, seed=repeat))
    results["unconstrained_tokens_per_s"] = {key: {"median": statistics.median(values), "runs": values}
                                             for key, values in rounds.items()}
    results["unconstrained_tokens_per_s"]["loaded_over_not_loaded_per_round"] = [
        a / b for a, b in zip(rounds["loaded"], rounds["not_loaded"], strict=True)]
    results["conditions"] = {"torch_threads": torch.get_num_threads(), "batch": args.batch,
                             "output_len": args.output_len, "repeats": args.repeats}

    compile_info = results["compile"]
    print(f"backend load (xgrammar import + tokenizer info): {compile_info['backend_load_s']:.2f} s")
    print(f"{'spec':<26}{'first compile ms':>18}{'cached ms':>12}")
    for name, row in compile_info["specs"].items():
        print(f"{name:<26}{row['first_ms']:>18.2f}{row['cached_ms']:>12.4f}")
    for key, row in results["mask"].items():
        print(f"mask per step, {key}: fill {row['fill_ms']:.3f} ms + apply {row['apply_ms']:.3f} ms "
              f"= {row['step_ms']:.3f} ms (median)")
    print(f"hooks per step for 8 unconstrained rows (backend loaded): "
          f"{results['hook_overhead_us_unconstrained_batch_8']:.1f} us (median)")
    tps = results["unconstrained_tokens_per_s"]
    ratios = tps["loaded_over_not_loaded_per_round"]
    print(f"unconstrained throughput (batch {args.batch}, {args.output_len} tokens): not loaded "
          f"{tps['not_loaded']['median']:.1f} tok/s, loaded {tps['loaded']['median']:.1f} tok/s; loaded/not loaded "
          f"per round {', '.join(f'{r:.3f}' for r in ratios)} (median {statistics.median(ratios):.3f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
