#!/usr/bin/env python
"""What online INT8 / INT4 weight quantisation buys and costs on CPU: weight bytes, decode and prefill speed against
bf16, and quality (teacher-forced KL, greedy agreement), written to ``benchmarks/quantization.md``.

* Speed: a V3.2-architecture model bigger than the CPU's last-level cache (hidden 2048, 4 layers, 32 experts of
  1408, vocabulary 32768: ~1.1 GB of bf16 weights), random weights (``--load-format dummy``), run through the offline
  ``LLM`` with ``--enforce-eager`` (compiling every mode's graphs takes minutes on a shared CPU; ``--compiled`` times
  the compiled decode graphs instead, what ``dsv32 serve`` runs by default). Decode
  tokens/s at batch 1 and 8: the engine's steps after the one that prefills the 32-token prompts, timed alone.
  Prefill: one 512-token prompt (``max_tokens`` 1). Median of ``--repeats`` runs with the spread.
* Quality: the tiny V3.2 preset (random weights, the real architecture), teacher-forced over a 1024-token sequence
  that bf16 itself generated greedily: the mean and max KL(bf16 || mode) of the next-token distributions, and how
  often the mode's argmax equals bf16's (greedy agreement). There is no trained small model in the repository:
  random weights give near-flat distributions, so these figures bound the numerical error, not a task's accuracy.

usage: quantization.py [--repeats 3] [--steps 32] [--out benchmarks/quantization.md]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.serving import engine_turn, load_lines  # noqa: E402
from dsv32.config import ModelConfig, tiny_config  # noqa: E402
from dsv32.engine.llm import LLM  # noqa: E402
from dsv32.engine.sampling_params import SamplingParams  # noqa: E402
from dsv32.model.batch import ForwardBatch  # noqa: E402
from dsv32.model.loader import load_model  # noqa: E402

MODES = (None, "int8", "int4")
REQUEST_IDS = itertools.count()
QUALITY_TOKENS = 1024
BLOCK = 64


def speed_config() -> ModelConfig:
    """hidden 2048, 1 dense + 3 MoE layers of 32 experts (top 4 + 1 shared) of 1408: ~1.1 GB in bf16."""
    return tiny_config().with_overrides(
        vocab_size=32768, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408, num_hidden_layers=4,
        first_k_dense_replace=1, num_attention_heads=16, q_lora_rank=768, qk_nope_head_dim=128, v_head_dim=128,
        n_routed_experts=32, n_group=4, topk_group=2, num_experts_per_tok=4, num_nextn_predict_layers=0)


def name(mode: str | None) -> str:
    return mode or "bf16"


def spread(samples: list[float]) -> str:
    return f"{statistics.median(samples):.1f} ({min(samples):.1f}-{max(samples):.1f})"


def decode_rate(llm: LLM, prompts: list[list[int]], steps: int) -> float:
    """Tokens/s of ``steps`` decode steps of ``prompts`` together: the engine's first step (their prefill and first
    tokens) runs untimed, then every following step is timed."""
    engine = llm.engine
    params = SamplingParams(max_tokens=1 + steps, temperature=0.0, ignore_eos=True)
    for prompt in prompts:
        engine.add_request(f"decode-{next(REQUEST_IDS)}", prompt, params)
    engine.step()
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return len(prompts) * steps / (time.perf_counter() - start)


def timed_generate(llm: LLM, prompts: list[list[int]], max_tokens: int) -> float:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - start


def measure_speed(args: argparse.Namespace) -> dict[str | None, dict[str, object]]:
    """Every mode's engine loaded side by side and timed in turns (bf16, int8, int4 within each repeat), so a burst
    of load from other jobs hits the modes of one repeat alike: the ratios are taken per repeat."""
    llms = {mode: LLM("tiny", model_config=speed_config(), dtype="bfloat16", quantization=mode,
                      enforce_eager=not args.compiled,
                      max_num_seqs=8, max_model_len=1024, max_num_batched_tokens=1024, enable_prefix_caching=False)
            for mode in MODES}
    results: dict[str | None, dict[str, object]] = {
        mode: {"weight_bytes": llm.engine.weight_bytes, "decode_b1": [], "decode_b8": [], "prefill": []}
        for mode, llm in llms.items()}
    for llm in llms.values():
        timed_generate(llm, [[5] * 16], 4)  # warm-up: first-call allocations, oneDNN kernel selection
    gen = torch.Generator().manual_seed(0)
    for _ in range(args.repeats):
        for batch in (1, 8):
            prompts = [torch.randint(10, 30000, (32,), generator=gen).tolist() for _ in range(batch)]
            for mode, llm in llms.items():
                results[mode][f"decode_b{batch}"].append(decode_rate(llm, prompts, args.steps))
        prompt = torch.randint(10, 30000, (512,), generator=gen).tolist()
        for mode, llm in llms.items():
            results[mode]["prefill"].append(512 / timed_generate(llm, [prompt], 1))
        print({name(m): {k: v[-1] for k, v in r.items() if k != "weight_bytes"} for m, r in results.items()},
              file=sys.stderr, flush=True)
    for llm in llms.values():
        llm.engine.close()
    return results


def teacher_forced_logits(config: ModelConfig, mode: str | None, ids: torch.Tensor) -> torch.Tensor:
    """fp32 next-token logits at every position of one sequence ``ids``, in one prefill."""
    model = load_model(config, None, "dummy", dtype="bfloat16", quantization=mode, progress=False)
    length = ids.shape[0]
    blocks = -(-length // BLOCK)
    cache = model.allocate_kv_cache(blocks, BLOCK, "auto")
    positions = torch.arange(length)
    batch = ForwardBatch(ids, positions, [0, length], [length], torch.arange(blocks)[None], positions)
    with torch.inference_mode():
        return model.compute_logits(model(batch, cache)).float()


def greedy_sequence(config: ModelConfig, length: int) -> torch.Tensor:
    """``length`` tokens bf16 generates greedily after a 16-token prompt (the sequence every mode is forced on)."""
    llm = LLM("tiny", model_config=config, dtype="bfloat16", enforce_eager=True, max_model_len=2048,
              max_num_seqs=1)
    prompt = torch.randint(10, min(config.vocab_size, 30000), (16,), generator=torch.Generator().manual_seed(1))
    out = llm.generate([{"prompt_token_ids": prompt.tolist()}],
                       SamplingParams(max_tokens=length - 16, temperature=0.0, ignore_eos=True), use_tqdm=False)
    llm.engine.close()
    return torch.tensor(prompt.tolist() + list(out[0].outputs[0].token_ids))


def measure_quality(config: ModelConfig) -> dict[str, tuple[float, float, float]]:
    ids = greedy_sequence(config, QUALITY_TOKENS)
    reference = teacher_forced_logits(config, None, ids).log_softmax(-1)
    rows = {}
    for mode in MODES[1:]:
        logp = teacher_forced_logits(config, mode, ids).log_softmax(-1)
        kl = (reference.exp() * (reference - logp)).sum(-1)
        agreement = (reference.argmax(-1) == logp.argmax(-1)).float().mean().item()
        rows[mode] = (kl.mean().item(), kl.max().item(), agreement)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per run")
    parser.add_argument("--compiled", action="store_true",
                        help="time the compiled decode graphs (default: eager, --enforce-eager)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "quantization.md"))
    args = parser.parse_args()
    torch.manual_seed(0)
    busy: list[str] = []
    with engine_turn("the three modes' engines", os.cpu_count() or 1, busy):
        speed = measure_speed(args)
    quality = {"tiny V3.2 preset": measure_quality(tiny_config())}
    base = speed[None]
    lines = ["| mode | weight bytes | x bf16 | decode tok/s b1 | x bf16 | decode tok/s b8 | x bf16 | prefill tok/s "
             "(512) | x bf16 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for mode in MODES:
        row = speed[mode]
        ratios = [statistics.median(a / b for a, b in zip(row[k], base[k], strict=True))
                  for k in ("decode_b1", "decode_b8", "prefill")]
        lines.append(f"| {name(mode)} | {row['weight_bytes'] / 2**20:,.0f} MiB | "
                     f"{row['weight_bytes'] / base['weight_bytes']:.2f} | {spread(row['decode_b1'])} | {ratios[0]:.2f} "
                     f"| {spread(row['decode_b8'])} | {ratios[1]:.2f} | {spread(row['prefill'])} | {ratios[2]:.2f} |")
    quality_lines = ["| model | mode | mean KL | max KL | greedy agreement |", "|---|---|---:|---:|---:|"]
    for model_name, rows in quality.items():
        for mode, (mean_kl, max_kl, agreement) in rows.items():
            quality_lines.append(f"| {model_name} | {mode} | {mean_kl:.2e} | {max_kl:.2e} | {agreement:.1%} |")
    cpu = torch.backends.cpu.get_cpu_capability()
    flags = f"--repeats {args.repeats} --steps {args.steps}{' --compiled' if args.compiled else ''}"
    report = "\n".join([
        "# Weight quantisation on CPU: bytes, speed, quality", "", f"`python benchmarks/quantization.py {flags}` on "
        f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}. "
        "The cores are shared with other jobs: timings are disturbed; each is the median of the runs with the "
        "(min-max) spread; the modes run in turns within each repeat and `x bf16` is the median of the per-repeat "
        "ratios.", "", *load_lines(busy),
        "", f"## Speed (speed model, {'compiled decode graphs' if args.compiled else 'eager'})", "", *lines, "",
        f"## Quality vs bf16 (teacher-forced, {QUALITY_TOKENS} tokens)", "", *quality_lines, ""])
    print(report)
    with open(args.out, "w") as fh:
        fh.write(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
