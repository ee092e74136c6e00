"""How close dsv32's decode comes to this machine's memory bandwidth: decode tok/s at batch 1 and 8 on a checkpoint far
bigger than the CPU's L3, the bytes each decode step must read, and the bandwidth that implies, beside a STREAM-like
triad measured in the same run (and, with --llama-dir, the same for llama.cpp on the checkpoint's GGUF).

Decode is memory-bound: every step streams the weights it uses once, whatever the batch. So
achieved bandwidth = bytes/step x steps/s (steps/s = decode tok/s / B), and its share of the triad's bandwidth says
how much of the machine the engine uses (the rest: compute, overheads, idle threads).

Bytes one decode step must read, from config.json (w: bytes per weight of the compute dtype, 2 for bf16; the parts
dsv32 keeps in fp32 count 4), at batch B with T tokens of context per sequence (prompt + new/2, the mean over the
decode); H hidden_size, q q_lora_rank, nh num_attention_heads, dn/dr/dv qk_nope/qk_rope/v head dims, r kv_lora_rank,
I intermediate_size, Im moe_intermediate_size, E n_routed_experts, k num_experts_per_tok, Ns n_shared_experts,
V vocab_size, Hi/Di index_n_heads/index_head_dim, topk index_topk:

    attention, every layer        w (H q + q nh (dn+dr) + H (r+dr) + r nh (dn+dv) + nh dv H) + 4 (q + r + 2H)
    indexer, every layer (V3.2)   w (q Hi Di + H Di) + 4 (H Hi + 2 Di)            (weights_proj, k_norm in fp32)
    dense FFN, each dense layer   w 3 H I
    router, each MoE layer        4 (E H + E)
    shared experts, each MoE      w 3 H Im Ns
    routed experts, each MoE      w 3 H Im n(B),  n(B) = E (1 - (1 - k/E)^B)   (= k at B = 1; at B > 1 the experts
                                  B uniformly routed tokens are expected to hit: an estimate, routing is not uniform)
    LM head + final norm          w V H + 4 H
    embeddings                    w B H                                          (one row per sequence)
    KV cache, every layer and     w ((r+dr) min(T, topk) + Di T [T > topk])   dsv32: the MLA reads only the
    sequence                                                                    indexer's top-k rows, the indexer every
                                                                                key (none while T <= topk)
                                  w (r+dr+Di) T                               llama.cpp: top-k as a mask over dense
                                                                                attention, every row read

(dsv32 loads no MTP layer without speculative decoding, so none is counted; the KV term is small beside the weights;
FP8 checkpoints are refused: the formula covers bf16 and fp32 ones.)

The memory bandwidth: STREAM's triad a = b + s c on three fp32 arrays of --triad-mib MiB each (far beyond L3) in
torch with the same thread count, 3 x the array bytes per pass; and a read-only pass (a.sum()) beside it.

dsv32's decode tok/s is measured as benchmarks/vs_llama_cpp.py measures it (``LLM``, prompt 128, 32 new tokens,
greedy, EOS ignored: B x 31 / (the time of a 32-token generate - that of a 1-token one)); llama.cpp's by
``llama-bench -p 0 -n 32 -d 128`` (batch 1, after a 128-token context) and the S_TG of ``llama-batched-bench -npp 128
-ntg 32 -npl 8`` (batch 8). Every figure: median (min-max) of --repeats samples.

The checkpoint (unless --checkpoint): make_tiny_checkpoint.py --arch v32 --dtype bfloat16 --kv-lora-rank 512
--rope-dim 64 --index-heads 16 --index-head-dim 128 --index-topk 64 --hidden 2048 --layers 8 --experts 64 (3.4 B
parameters, 6.8 GB). HF's classes build it in fp32 first (about 5 bytes of RAM per parameter, measured): when that
does not fit in the memory available, the number of experts is halved until it does, and the report says so.

usage: python benchmarks/roofline.py [--checkpoint DIR | --hidden 2048 --layers 8 --experts 64] [--llama-dir DIR]
           [--repeats 3] [--threads 2] [--triad-mib 256] [--enforce-eager] [--work-dir DIR] [--output FILE.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.serving import (  # noqa: E402  (the repository root, not benchmarks/, holds the package)
    INPUT_LEN,
    OUTPUT_LEN,
    BenchmarkError,
    checkout_description,
    clean_env,
    engine_turn,
    load_lines,
    machine_description,
    make_checkpoint,
)
from benchmarks.vs_llama_cpp import (  # noqa: E402
    Spread,
    convert_to_gguf,
    ensure_llama,
    llama_batched_bench,
    llama_bench,
    run_dsv32_offline,
    show,
)
from dsv32.config import ModelConfig  # noqa: E402

BATCH_SIZES = (1, 8)
CONTEXT = INPUT_LEN + OUTPUT_LEN // 2  # mean context length over the decode
BASE_FLAGS = ("--arch", "v32", "--dtype", "bfloat16", "--kv-lora-rank", "512", "--rope-dim", "64",
              "--index-heads", "16", "--index-head-dim", "128", "--index-topk", "64")
VOCAB = 129280  # make_tiny_checkpoint.py's (the real tokenizer's)
BYTES_PER_PARAM_TO_MAKE = 5.0  # peak RSS of make_tiny_checkpoint.py per parameter (fp32 build + bf16 copy), measured
MIN_EXPERTS = 8
TRIAD_PASSES = 10


# ---- bytes per decode step ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepBytes:
    """Bytes one decode step reads, by part (the docstring's formula)."""

    attention: float
    indexer: float
    dense_ffn: float
    router: float
    shared_experts: float
    routed_experts: float
    lm_head: float
    embeddings: float
    kv_cache: float

    @property
    def total(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self))


def expected_experts(num_experts: int, top_k: int, batch: int) -> float:
    """Distinct experts that ``batch`` tokens, each routed to ``top_k`` of ``num_experts`` uniformly, are expected to
    hit: E (1 - (1 - k/E)^B) (exactly k at batch 1)."""
    return num_experts * (1 - (1 - top_k / num_experts) ** batch)


def decode_step_bytes(c: ModelConfig, batch: int, context: int, weight_bytes: int = 2,
                      dense_attention: bool = False) -> StepBytes:
    """The docstring's formula; ``dense_attention``: every context row is read (llama.cpp), not the top-k only."""
    w, f32 = weight_bytes, 4
    hidden, q, heads = c.hidden_size, c.q_lora_rank, c.num_attention_heads
    r, dr, dn, dv = c.kv_lora_rank, c.qk_rope_head_dim, c.qk_nope_head_dim, c.v_head_dim
    layers = c.num_hidden_layers
    moe_layers = sum(c.is_moe_layer(i) for i in range(layers))
    attention = w * (hidden * q + q * heads * (dn + dr) + hidden * (r + dr) + r * heads * (dn + dv)
                     + heads * dv * hidden) + f32 * (q + r + 2 * hidden)
    indexer = 0.0
    latent_rows, index_rows = context, 0
    if c.has_indexer:
        hi, di = c.index_n_heads, c.index_head_dim
        indexer = w * (q * hi * di + hidden * di) + f32 * (hidden * hi + 2 * di)
        if dense_attention:
            index_rows = context
        else:
            latent_rows = min(context, c.index_topk)
            index_rows = context if context > c.index_topk else 0
    kv_per_layer = w * ((r + dr) * latent_rows + (c.index_head_dim if c.has_indexer else 0) * index_rows)
    expert = w * 3 * hidden * c.moe_intermediate_size
    return StepBytes(
        attention=layers * attention,
        indexer=layers * indexer,
        dense_ffn=(layers - moe_layers) * w * 3 * hidden * c.intermediate_size,
        router=moe_layers * f32 * (c.n_routed_experts * hidden + c.n_routed_experts),
        shared_experts=moe_layers * expert * c.n_shared_experts,
        routed_experts=moe_layers * expert * expected_experts(c.n_routed_experts, c.num_experts_per_tok, batch),
        lm_head=w * c.vocab_size * hidden + f32 * hidden,
        embeddings=w * batch * hidden,
        kv_cache=layers * batch * kv_per_layer,
    )


def all_weight_bytes(c: ModelConfig, weight_bytes: int = 2) -> float:
    """Every weight the engine holds (all experts, the whole embedding table): to check the formula against the
    checkpoint's files."""
    one = decode_step_bytes(c, 1, 0, weight_bytes)
    moe_layers = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
    routed = moe_layers * weight_bytes * 3 * c.hidden_size * c.moe_intermediate_size * c.n_routed_experts
    return one.total - one.routed_experts - one.embeddings + routed + weight_bytes * c.vocab_size * c.hidden_size


# ---- the checkpoint -----------------------------------------------------------------------------------------------


def estimated_parameters(hidden: int, layers: int, experts: int) -> float:
    """Parameters of a make_tiny_checkpoint.py checkpoint (its shapes: embeddings and head of VOCAB rows, one dense
    layer of intermediate 2H, MoE layers of E + 1 experts of intermediate H / 2; attention is small beside them)."""
    return 2 * VOCAB * hidden + 3 * hidden * 2 * hidden + (layers - 1) * (experts + 1) * 3 * hidden * (hidden // 2)


def available_memory() -> float:
    """MemAvailable of /proc/meminfo in bytes (inf where unknown)."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


def fitting_experts(hidden: int, layers: int, experts: int, memory: float) -> int:
    """``experts``, halved until making the checkpoint fits in ``memory`` (at least MIN_EXPERTS)."""
    while experts > MIN_EXPERTS and estimated_parameters(hidden, layers, experts) * BYTES_PER_PARAM_TO_MAKE > memory:
        experts //= 2
    return experts


def roofline_checkpoint(args: argparse.Namespace) -> tuple[Path, str]:
    """The checkpoint to measure and a line saying what it is (and why it is smaller than asked, if it is)."""
    if args.checkpoint:
        return args.checkpoint, f"`{args.checkpoint}`"
    memory = available_memory()
    experts = fitting_experts(args.hidden, args.layers, args.experts, memory - 2 * 2**30)
    flags = (*BASE_FLAGS, "--hidden", str(args.hidden), "--layers", str(args.layers), "--experts", str(experts))
    name = f"roofline-v32-h{args.hidden}-l{args.layers}-e{experts}-bf16"
    line = f"`make_tiny_checkpoint.py {' '.join(flags)}`"
    if experts != args.experts:
        need = estimated_parameters(args.hidden, args.layers, args.experts) * BYTES_PER_PARAM_TO_MAKE / 2**30
        note = (f"{experts} experts instead of {args.experts}: making {args.experts} with HF's classes needs about "
                f"{need:.0f} GiB of RAM, {memory / 2**30:.0f} GiB are available")
        print(f"note: {note}", flush=True)
        line += f" ({note})"
    return make_checkpoint(args.work_dir, name, flags), line


def checkpoint_file_bytes(checkpoint: Path) -> int:
    return sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))


# ---- the triad: a worker process ----------------------------------------------------------------------------------


def triad_worker(args: argparse.Namespace) -> None:
    """In its own process: STREAM's triad and a read-only sum over --triad-mib MiB fp32 arrays, GB/s per pass."""
    import torch

    torch.set_num_threads(args.threads)
    n = args.triad_mib * 2**20 // 4
    a, b, c = torch.zeros(n), torch.rand(n), torch.rand(n)
    triad, read = [], []
    for sample in range(TRIAD_PASSES + 1):  # the first pass of each warms up
        start = time.perf_counter()
        torch.add(b, c, alpha=3.0, out=a)
        seconds = time.perf_counter() - start
        if sample:
            triad.append(3 * n * 4 / seconds / 1e9)
    for sample in range(TRIAD_PASSES + 1):
        start = time.perf_counter()
        a.sum()
        seconds = time.perf_counter() - start
        if sample:
            read.append(n * 4 / seconds / 1e9)
    Path(args.triad_worker).write_text(json.dumps({"triad": triad, "read": read, "threads": torch.get_num_threads()}))


def measure_bandwidth(args: argparse.Namespace) -> dict:
    out = args.work_dir / "triad.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--triad-worker", str(out), "--threads",
               str(args.threads), "--triad-mib", str(args.triad_mib)]
    if subprocess.call(command, env=clean_env(OMP_NUM_THREADS=str(args.threads)), cwd=REPO) != 0:
        raise BenchmarkError("the triad worker failed (its output is above)")
    return json.loads(out.read_text())


# ---- llama.cpp ----------------------------------------------------------------------------------------------------


def llama_decode(args: argparse.Namespace, gguf: Path) -> dict[int, list[float]]:
    """llama.cpp's decode tok/s samples per batch size: llama-bench tg32 after a 128-token context (batch 1),
    llama-batched-bench S_TG (batch 8, once per repeat)."""
    samples: dict[int, list[float]] = {}
    log = args.work_dir / "llama-bench-tg.log"
    records = llama_bench(args.llama_dir, gguf, args.threads, args.repeats, log, "-p", "0", "-n", str(OUTPUT_LEN),
                          "-d", str(INPUT_LEN))
    samples[1] = [ts for record in records for ts in record["samples_ts"]]
    batched = [b for b in BATCH_SIZES if b > 1]
    for b in batched:
        samples[b] = []
    for repeat in range(args.repeats):
        log = args.work_dir / f"llama-batched-bench-r{repeat}.log"
        for b, record in llama_batched_bench(args.llama_dir, gguf, args.threads, batched, log).items():
            samples[b].append(record["speed_tg"])
    return samples


# ---- the report ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    engine: str
    batch: int
    decode: Spread | None
    bytes_per_step: float

    def bandwidth(self) -> float | None:
        """Achieved GB/s at the median decode rate."""
        return self.bytes_per_step * self.decode.median / self.batch / 1e9 if self.decode else None


def report(rows: list[Row], step_bytes: dict[int, StepBytes], bandwidth: dict, context: dict[str, str],
           args: argparse.Namespace) -> str:
    triad, read = Spread.of(bandwidth["triad"]), Spread.of(bandwidth["read"])
    lines = [
        "# Decode against the memory roofline",
        "",
        f"Written by `python benchmarks/roofline.py {' '.join(args.argv)}` on {datetime.now():%Y-%m-%d %H:%M}: "
        f"{context['machine']}; dsv32 {context['checkout']}.",
        "",
        f"- Checkpoint: {context['checkpoint']}: {context['weights']}.",
        f"- {args.threads} threads; dsv32 mode: {'eager' if args.enforce_eager else 'its default'}; every figure: "
        f"median (min-max) of {args.repeats} repeat(s) (bandwidth: of {TRIAD_PASSES} passes); context {CONTEXT} "
        f"tokens per sequence (prompt {INPUT_LEN}, {OUTPUT_LEN} new).",
        *load_lines(args.busy),
        f"- Memory bandwidth, {args.threads} threads, fp32 arrays of {args.triad_mib} MiB: triad {show(triad)} GB/s, "
        f"read-only {show(read)} GB/s.",
        "",
        "| Engine | Batch | Decode tok/s | Step (ms) | Read per step (MB) | Achieved GB/s | Share of triad |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        achieved = row.bandwidth()
        step_ms = f"{1e3 * row.batch / row.decode.median:.2f}" if row.decode else "n/a"
        lines.append(f"| {row.engine} | {row.batch} | {show(row.decode)} | {step_ms} | "
                     f"{row.bytes_per_step / 1e6:.1f} | {f'{achieved:.1f}' if achieved else 'n/a'} | "
                     f"{f'{achieved / triad.median:.0%}' if achieved and triad else 'n/a'} |")
    lines += [
        "",
        "Bytes per decode step by part (dsv32's; llama.cpp's differ in the KV cache only), MB:",
        "",
        "| Part | " + " | ".join(f"batch {b}" for b in step_bytes) + " |",
        "|---|" + "---|" * len(step_bytes),
    ]
    for f in fields(StepBytes):
        lines.append(f"| {f.name.replace('_', ' ')} | "
                     + " | ".join(f"{getattr(s, f.name) / 1e6:.2f}" for s in step_bytes.values()) + " |")
    lines.append("| **total** | " + " | ".join(f"**{s.total / 1e6:.1f}**" for s in step_bytes.values()) + " |")
    return "\n".join(lines) + "\n"


# ---- the driver ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="an HF V3/V3.2 checkpoint (default: make one)")
    parser.add_argument("--hidden", type=int, default=2048, help="hidden size of the checkpoint made")
    parser.add_argument("--layers", type=int, default=8, help="layers of the checkpoint made")
    parser.add_argument("--experts", type=int, default=64, help="routed experts of the checkpoint made (halved "
                        "until making it fits in RAM)")
    parser.add_argument("--llama-dir", type=Path, help="llama.cpp built by setup_llama_cpp.sh: measure it too")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/dsv32_roofline"), help="checkpoint, logs, JSON")
    parser.add_argument("--repeats", type=int, default=3, help="samples of every decode figure")
    parser.add_argument("--threads", type=int, default=2, help="threads of each engine and of the triad")
    parser.add_argument("--triad-mib", type=int, default=256, help="size of each triad array")
    parser.add_argument("--enforce-eager", action="store_true", help="run dsv32 eagerly")
    parser.add_argument("--output", type=Path, help="also write the report here (e.g. benchmarks/roofline.md)")
    parser.add_argument("--triad-worker", help=argparse.SUPPRESS)  # internal: measure bandwidth, write JSON here
    args = parser.parse_args(argv)
    if args.triad_worker:
        triad_worker(args)
        return 0
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be at least 1")
    args.argv = sys.argv[1:] if argv is None else argv
    args.cores = len(os.sched_getaffinity(0))
    args.busy = []
    try:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        checkpoint, checkpoint_line = roofline_checkpoint(args)
        config = ModelConfig.from_pretrained(str(checkpoint))
        if config.quantization is not None:
            raise BenchmarkError(f"{checkpoint} is an FP8 checkpoint: the byte formula covers bf16 and fp32 ones")
        weight_bytes = 4 if config.torch_dtype == "float32" else 2
        step_bytes = {b: decode_step_bytes(config, b, CONTEXT, weight_bytes) for b in BATCH_SIZES}
        files, formula = checkpoint_file_bytes(checkpoint), all_weight_bytes(config, weight_bytes)
        weights_line = (f"{formula / 1e9:.2f} GB of weights by the formula, {files / 1e9:.2f} GB of safetensors "
                        f"files ({formula / files:.3f}x)")
        print(f"{checkpoint}: {weights_line}", flush=True)

        with engine_turn("the bandwidth test", args.cores, args.busy):
            bandwidth = measure_bandwidth(args)
        print(f"triad {show(Spread.of(bandwidth['triad']))} GB/s, read {show(Spread.of(bandwidth['read']))} GB/s")
        with engine_turn("dsv32", args.cores, args.busy):
            samples, _ = run_dsv32_offline(checkpoint, args.work_dir, args.threads, args.repeats, args.enforce_eager)
        rows = [Row("dsv32", b, Spread.of(samples[f"decode@{b}"]), step_bytes[b].total) for b in BATCH_SIZES]
        if args.llama_dir:
            ensure_llama(args.llama_dir, args.work_dir)
            gguf = convert_to_gguf(args.llama_dir, checkpoint, args.work_dir)
            with engine_turn("llama.cpp", args.cores, args.busy):
                decode = llama_decode(args, gguf)
            for b, values in decode.items():
                dense = decode_step_bytes(config, b, CONTEXT, weight_bytes, dense_attention=True)
                rows.append(Row("llama.cpp", b, Spread.of(values), dense.total))

        context = {"machine": machine_description(args.cores), "checkout": checkout_description(),
                   "checkpoint": checkpoint_line, "weights": weights_line}
        text = report(rows, step_bytes, bandwidth, context, args)
    except (BenchmarkError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print("\n" + text)
    if args.output:
        args.output.write_text(text)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
