#!/usr/bin/env python
"""Offline generation throughput: our ``LLM.generate`` against HF transformers' ``generate``.

Each engine runs in a process of its own, alone, one after the other (never both in one process: a second engine in
the same process measured 5x slower than alone), with the same torch thread count, on the same tiny DeepSeek-V3.2
checkpoint (HF's own classes wrote it), the same random prompts and greedy decoding of exactly ``--output-len`` new
tokens (EOS ignored). Prefix caching is off so repeated runs get no help. Prints output tokens/s of each and the
ratio per batch size, and HF's own prefill / decode rates beside the figures in ``../shared/peers/README.md``: a peer
far below its reference means the comparison is broken (a loaded machine, a wrong thread count), and it says so.

usage: offline_throughput.py [--checkpoint DIR] [--batch-sizes 1 8 16 32] [--input-len 128] [--output-len 64]
Without --checkpoint, one is written to a temporary folder with the peers' make_tiny_checkpoint.py (bf16).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

PEERS = "/work/shared/peers"
DEFAULT_CHECKPOINT_MAKER = os.path.join(PEERS, "make_tiny_checkpoint.py")
PEERS_README = os.path.join(PEERS, "README.md")
REFERENCE_ROW = "HF, V3.2 bf16"  # the README row measured on the same kind of checkpoint
# A peer below this share of its reference figure is not running as it should (the README's noise is about 15%).
BROKEN_BELOW = 0.7
# Run from a checkout: the repository root, not this folder, is where ``dsv32`` lives.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def spread(tokens: int, runs: list[float]) -> str:
    """The (min-max) tokens/s of ``tokens`` generated in each of ``runs`` seconds."""
    return f"({tokens / max(runs):.1f}-{tokens / min(runs):.1f})"


def make_checkpoint(maker: str, out: str) -> None:
    if not os.path.isfile(maker):
        sys.exit(f"no --checkpoint given and the checkpoint maker {maker} does not exist; pass --checkpoint DIR")
    subprocess.run([sys.executable, maker, out, "--arch", "v32", "--dtype", "bfloat16"], check=True,
                   stdout=subprocess.DEVNULL)


def random_prompts(batch_size: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 100_000) for _ in range(length)] for _ in range(batch_size)]


def reference_figures(readme: str = PEERS_README) -> dict[str, float] | None:
    """HF's figures for V3.2 bf16 in the peers' README (prompt 128, 2 threads): prefill and decode tok/s at batch 1
    and 8; None when the file or the row is missing."""
    try:
        with open(readme, encoding="utf-8") as fh:
            text = fh.read()
    except OSError:
        return None
    match = re.search(rf"^\|\s*{re.escape(REFERENCE_ROW)}\s*\|([^\n]*)$", text, re.MULTILINE)
    if match is None:
        return None
    numbers = [float(cell) for cell in match.group(1).split("|") if cell.strip()]
    if len(numbers) != 4:
        return None
    return dict(zip(("b1_prefill", "b1_decode", "b8_prefill", "b8_decode"), numbers, strict=True))


# ---- the workers: one engine per process ----------------------------------------------------------------------------


def dsv32_runner(args: argparse.Namespace, **engine_kwargs: Any) -> Callable[[list[list[int]], int], list[list[int]]]:
    """``run(prompts, output_len)``: greedy token ids of every prompt (EOS ignored) from a dsv32 ``LLM`` sized for
    ``args`` (``checkpoint``, ``dtype``, ``device``, ``batch_sizes``, ``input_len``, ``output_len``), prefix caching
    off; ``engine_kwargs``: more ``EngineConfig`` fields (e.g. ``enforce_eager``)."""
    from dsv32 import LLM, SamplingParams

    max_batch = max(args.batch_sizes)
    llm = LLM(args.checkpoint, dtype=args.dtype, device=args.device,
              max_model_len=args.input_len + args.output_len + 64, max_num_seqs=max(max_batch, 8),
              max_num_batched_tokens=max(2048, max_batch * args.input_len), enable_prefix_caching=False,
              **engine_kwargs)

    def run(prompts: list[list[int]], output_len: int) -> list[list[int]]:
        params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == output_len for o in outs)
        return [list(o.outputs[0].token_ids) for o in outs]

    return run


def _hf_engine(args: argparse.Namespace):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=getattr(torch, args.dtype))
    model = model.to(args.device).eval()

    @torch.inference_mode()
    def run(prompts: list[list[int]], output_len: int) -> list[list[int]]:
        input_ids = torch.tensor(prompts, dtype=torch.long, device=args.device)  # equal lengths: no padding
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=output_len, min_new_tokens=output_len, pad_token_id=0)
        generated = out[:, input_ids.shape[1]:]
        assert generated.shape == (len(prompts), output_len)
        return generated.tolist()

    return run


def worker(args: argparse.Namespace) -> None:
    """Time one engine (``args.worker``) on every batch size and write the results to ``args.out``."""
    import torch

    torch.set_num_threads(args.threads)
    run = dsv32_runner(args) if args.worker == "dsv32" else _hf_engine(args)
    results: dict[str, dict] = {}
    for batch_size in args.batch_sizes:
        run(random_prompts(batch_size, args.input_len, seed=-batch_size), 4)  # warm-up
        runs, prefill_runs, tokens = [], [], []
        for repeat in range(args.repeats):
            prompts = random_prompts(batch_size, args.input_len, seed=1000 * batch_size + repeat)
            start = time.perf_counter()
            run(prompts, 1)
            prefill_runs.append(time.perf_counter() - start)
            start = time.perf_counter()
            tokens = run(prompts, args.output_len)
            runs.append(time.perf_counter() - start)
        results[str(batch_size)] = {"seconds": statistics.median(runs), "runs": runs,
                                    "prefill_seconds": statistics.median(prefill_runs), "tokens": tokens}
        print(f"  {args.worker} batch {batch_size}: {batch_size * args.output_len / statistics.median(runs):.1f} "
              f"tok/s {spread(batch_size * args.output_len, runs)}", flush=True)
    results["threads"] = torch.get_num_threads()
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(results, fh)


def run_worker(engine: str, checkpoint: str, args: argparse.Namespace, out: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", engine, "--checkpoint", checkpoint,
               "--out", out, "--batch-sizes", *map(str, args.batch_sizes), "--input-len", str(args.input_len),
               "--output-len", str(args.output_len), "--dtype", args.dtype, "--device", args.device,
               "--repeats", str(args.repeats), "--threads", str(args.threads)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (ROOT, os.environ.get("PYTHONPATH")))))
    print(f"{engine}: its own process, {args.threads} threads", flush=True)
    subprocess.run(command, check=True, env=env)
    with open(out, encoding="utf-8") as fh:
        return json.load(fh)


# ---- the driver -----------------------------------------------------------------------------------------------------


def decode_rate(result: dict, batch_size: int, args: argparse.Namespace) -> tuple[float, float | None]:
    """(prefill tok/s, decode tok/s) of one batch size: the prefill-only run, and the rest of the full run (None
    when the full run was not slower than the prefill alone: timing noise, nothing to compare)."""
    entry = result[str(batch_size)]
    prefill = entry["prefill_seconds"]
    decode_s = entry["seconds"] - prefill
    decode = batch_size * (args.output_len - 1) / decode_s if decode_s > 0 else None
    return batch_size * args.input_len / prefill, decode


def peer_check(hf: dict, args: argparse.Namespace, reference: dict[str, float] | None) -> list[str]:
    """HF's prefill / decode rates beside the README's, flagged when far below."""
    if reference is None:
        return [f"no reference figures ({PEERS_README} row {REFERENCE_ROW!r} not found): the HF figure is unchecked"]
    lines = []
    for batch_size in (1, 8):
        if batch_size not in args.batch_sizes:
            continue
        for kind, measured in zip(("prefill", "decode"), decode_rate(hf, batch_size, args), strict=True):
            ref = reference[f"b{batch_size}_{kind}"]
            if measured is None:
                lines.append(f"HF batch {batch_size} {kind}: not measurable (the full run was not slower than its "
                             "prefill: timing noise)")
                continue
            verdict = "ok" if measured >= BROKEN_BELOW * ref else "BROKEN COMPARISON: far below its reference"
            lines.append(f"HF batch {batch_size} {kind}: {measured:8.1f} tok/s, reference {ref:8.1f} "
                         f"({measured / ref:.2f}x) {verdict}")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="tiny V3.2 HF checkpoint folder (default: write one to a temp folder)")
    p.add_argument("--make-checkpoint", default=DEFAULT_CHECKPOINT_MAKER, help="script that writes it")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16, 32])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--device", default="cpu", help="cpu or cuda (both engines run there)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per engine and batch size (the median is "
                   "reported, with the spread)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads of each engine's process")
    p.add_argument("--engines", nargs="+", default=["dsv32", "hf"], choices=["dsv32", "hf"])
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--worker", choices=["dsv32", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    with tempfile.TemporaryDirectory(prefix="dsv32-bench-") as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = os.path.join(tmp, "tiny-v32-bf16")
            make_checkpoint(args.make_checkpoint, checkpoint)
        results = {engine: run_worker(engine, checkpoint, args, os.path.join(tmp, f"{engine}.json"))
                   for engine in args.engines}

    print(f"\nthroughput (output tokens/s), input {args.input_len}, output {args.output_len}, {args.dtype}, "
          f"{args.device}, {args.threads} threads, each engine alone in its own process, median of {args.repeats} "
          "runs (min-max)")
    if set(results) != {"dsv32", "hf"}:
        for engine, result in results.items():
            for b in args.batch_sizes:
                print(f"{engine} batch {b}: {b * args.output_len / result[str(b)]['seconds']:.1f} tok/s "
                      f"{spread(b * args.output_len, result[str(b)]['runs'])}")
        return
    rows = []
    for b in args.batch_sizes:
        ours, hf = results["dsv32"][str(b)], results["hf"][str(b)]
        agree = sum(common_prefix(x, y) for x, y in zip(ours["tokens"], hf["tokens"], strict=True))
        generated = b * args.output_len
        rows.append(Row(b, generated / ours["seconds"], generated / hf["seconds"], hf["seconds"] / ours["seconds"],
                        ours["seconds"], hf["seconds"], agree / generated))
    print(f"{'batch':>5} {'dsv32 tok/s':>26} {'HF tok/s':>26} {'ratio':>7} {'same':>6}")
    for r in rows:
        generated = r.batch_size * args.output_len
        ours = f"{r.ours_tokens_per_s:.1f} {spread(generated, results['dsv32'][str(r.batch_size)]['runs'])}"
        hf = f"{r.hf_tokens_per_s:.1f} {spread(generated, results['hf'][str(r.batch_size)]['runs'])}"
        print(f"{r.batch_size:>5} {ours:>26} {hf:>26} {r.ratio:>6.2f}x {r.greedy_agreement:>6.0%}")
    print("same: mean share of each output that both engines generated identically (up to the first divergence)")
    print(f"\nthe peer against {PEERS_README} ({REFERENCE_ROW}, prompt 128, 2 threads; comparable with "
          f"--input-len 128 --threads 2):")
    for line in peer_check(results["hf"], args, reference_figures()):
        print("  " + line)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"args": vars(args), "rows": [asdict(r) for r in rows]}, fh, indent=2)


if __name__ == "__main__":
    main()
