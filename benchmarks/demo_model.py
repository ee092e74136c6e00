#!/usr/bin/env python
"""The demo model's MTP and DSA figures (issue 25), on the corpus's held-out prompts (``dsv32.train.corpus.examples(
..., split="heldout")``: numbers and cities never trained on), each rendered as the server renders a chat request
(``prepare_chat_request``, then the tokenizer, as ``LLM.chat`` and ``/v1/chat/completions`` do).

1. MTP acceptance, offline: ``LLM(CKPT, speculative_config={"method": "mtp", "num_speculative_tokens": k})`` for each
   ``--ks``, greedy, ``--max-tokens`` per reply (EOS ends it), ``--prompts-per-task`` prompts of every task. From the
   engine's own counters (``EngineStats.spec_decode``, what ``/metrics`` exports as ``vllm:spec_decode_*``): the mean
   acceptance length 1 + accepted / drafts (vLLM's definition: tokens per verify step, the bonus token included), the
   draft acceptance rate accepted / draft tokens, and per draft position the share of drafts accepted up to it. A
   run without speculation gives the reference tokens: every k must produce the same ones (greedy speculation is
   exact).
2. MTP speed-up served: ``dsv32 serve CKPT`` (``--no-enable-prefix-caching``, so every run prefills its prompts) with
   no speculation and with ``--speculative-config '{"method": "mtp", "num_speculative_tokens": k}'`` for each
   ``--serve-ks``, each server in its own process, driven by ``dsv32 bench serve`` at each ``--concurrencies`` on the
   held-out chat prompts (a ShareGPT-format file of the rendered prompts, sent to ``/v1/completions`` with
   ``add_special_tokens: false``, so the server sees exactly the chat prompt's tokens; ``max_tokens`` =
   ``--max-tokens``, greedy, EOS ends a reply; before each run as many warm-up requests as its concurrency, which
   ``bench serve`` sends at that concurrency). ``--repeats`` rounds, the servers' order rotating from round to
   round; the speed-up is output tok/s over the same round's no-speculation run at the same concurrency, reported as
   median (min-max) over the rounds. The machine's load is checked before and during each server's turn.
3. DSA: on long held-out token sequences (whole conversations, prompt and replies, of at least ``--dsa-min-len``
   tokens; and conversations joined to ``--dsa-long-len`` tokens, beyond the training lengths), per attention layer
   (the MTP layer's included): the share of the dense attention's probability mass (summed over heads, normalised)
   that the indexer's top-``index_topk`` keys hold (recall), averaged over the queries that have more causal keys
   than ``index_topk`` (the only ones sparse attention prunes); beside it what the best possible top-k (the dense
   mass's own) and the last ``index_topk`` keys (a sliding window) would keep. Then sparse against dense attention
   over the whole model: the logit difference (max and mean absolute, over the pruned positions and the distinct
   LM-head rows), greedy agreement, and the next-token loss of both.
   Computed with the trainer's network (``dsv32.train.network``, fp32), loaded from the checkpoint: plain PyTorch
   whose attention exposes its full score matrices and the indexer's scores (``MLA.attention_logits``), run with
   ``sparse`` off and on; its logits equal dsv32's and HF transformers' on exported checkpoints (within 1e-4, fp32,
   sparse attention pruning: ``tests/train/test_export.py``). dsv32's own kernels (``dsv32.kernels.reference``)
   take the softmax inside each call over the paged cache and return only the attention's output; the trainer's
   network computes a whole sequence's ``[L, L]`` matrices, which recall needs, and turns sparse attention on and
   off with one flag.

usage: demo_model.py --checkpoint DIR [--output FILE.md] [--parts mtp serve dsa] [--repeats 3] [--enforce-eager]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.serving import (  # noqa: E402  (the repository root, not benchmarks/, holds the package)
    MODEL_NAME,
    BenchmarkError,
    RunningServer,
    ServerSpec,
    Spread,
    checkout_description,
    dsv32_server,
    engine_turn,
    free_port,
    load_lines,
    machine_description,
    run_step,
    show,
)
from dsv32.config import ModelConfig  # noqa: E402
from dsv32.encoding import prepare_chat_request  # noqa: E402
from dsv32.engine.llm import LLM  # noqa: E402
from dsv32.engine.outputs import SpecDecodeStats  # noqa: E402
from dsv32.engine.sampling_params import SamplingParams  # noqa: E402
from dsv32.tokenizer import Tokenizer  # noqa: E402
from dsv32.train.corpus import TASKS, Example, examples, render  # noqa: E402
from dsv32.train.demo import tokenize  # noqa: E402
from dsv32.train.network import MLA, TrainableDeepseekV32  # noqa: E402

PARTS = ("mtp", "serve", "dsa")
# Seeds of the held-out draws: the acceptance prompts, the served prompts and the DSA sequences differ.
MTP_SEED, SERVE_SEED, DSA_SEED = 1, 2, 3
ALL_TASKS = "all"


# ---- held-out prompts -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """One held-out chat request as the server prompts the model: its text and token ids, and the reference reply."""

    task: str
    text: str
    token_ids: list[int]
    reference_reply: str


def chat_prompt(example: Example, tokenizer: Tokenizer) -> Prompt:
    """The request rendered by ``prepare_chat_request`` and tokenized as the chat endpoint and ``LLM.chat`` do (the
    text starts with BOS already); the reference reply is the corpus's first assistant message, rendered."""
    text = prepare_chat_request(**example.request).prompt
    segments = render(example).segments
    return Prompt(example.task, text, tokenizer.encode(text), segments[1][0])


def heldout_prompts(tokenizer: Tokenizer, count: int, seed: int, tasks: Sequence[str]) -> list[Prompt]:
    """``count`` held-out prompts of each task of ``tasks``."""
    return [chat_prompt(ex, tokenizer) for task in tasks for ex in examples(count, seed, "heldout", (task,))]


# ---- 1. MTP acceptance ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Acceptance:
    """The speculative-decoding counters of one task's generations at ``k`` draft tokens."""

    task: str
    k: int
    stats: SpecDecodeStats
    output_tokens: int
    same_tokens: bool  # the tokens equal the run without speculation's

    @property
    def mean_length(self) -> float:
        """vLLM's mean acceptance length: tokens per verify step, 1 + accepted / drafts (nan without drafts)."""
        return self.stats.mean_acceptance_length if self.stats.num_drafts else math.nan

    @property
    def draft_acceptance_rate(self) -> float:
        return self.stats.num_accepted_tokens / self.stats.num_draft_tokens if self.stats.num_draft_tokens else math.nan

    @property
    def per_position(self) -> list[float]:
        """Per draft position i: the share of drafts whose first i + 1 tokens were accepted."""
        counts = self.stats.accepted_per_pos + [0] * (self.k - len(self.stats.accepted_per_pos))
        return [n / self.stats.num_drafts if self.stats.num_drafts else math.nan for n in counts[:self.k]]


def spec_counters(llm: LLM) -> SpecDecodeStats:
    return llm.engine.stats().spec_decode or SpecDecodeStats()


def generate(llm: LLM, prompts: list[Prompt], max_tokens: int) -> list[list[int]]:
    """Greedy replies to ``prompts`` (one batch), as token ids."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    outputs = llm.generate([{"prompt_token_ids": p.token_ids} for p in prompts], params, use_tqdm=False)
    return [list(out.outputs[0].token_ids) for out in outputs]


def offline_llm(checkpoint: Path, args: argparse.Namespace, k: int) -> LLM:
    spec = {"speculative_config": {"method": "mtp", "num_speculative_tokens": k}} if k else {}
    return LLM(str(checkpoint), dtype=args.dtype, device="cpu", enforce_eager=True, enable_prefix_caching=False,
               seed=0, **spec)


def measure_acceptance(checkpoint: Path, prompts: list[Prompt], args: argparse.Namespace) -> list[Acceptance]:
    """One engine per k (eager: acceptance does not depend on compiled graphs), after a reference run without
    speculation; per k a row per task (one batch each) and one for all tasks."""
    by_task = {task: [p for p in prompts if p.task == task] for task in dict.fromkeys(p.task for p in prompts)}
    print("MTP acceptance: reference run without speculation", flush=True)
    llm = offline_llm(checkpoint, args, 0)
    reference = {task: generate(llm, batch, args.max_tokens) for task, batch in by_task.items()}
    llm.engine.close()
    rows: list[Acceptance] = []
    for k in args.ks:
        print(f"MTP acceptance: k = {k}", flush=True)
        llm = offline_llm(checkpoint, args, k)
        start = spec_counters(llm)
        tokens: dict[str, list[list[int]]] = {}
        for task, batch in by_task.items():
            before = spec_counters(llm)
            tokens[task] = generate(llm, batch, args.max_tokens)
            rows.append(Acceptance(task, k, spec_counters(llm).since(before), sum(map(len, tokens[task])),
                                   tokens[task] == reference[task]))
            print(f"  {task:<10} acceptance length {fmt(rows[-1].mean_length)}", flush=True)
        rows.append(Acceptance(ALL_TASKS, k, spec_counters(llm).since(start),
                               sum(len(t) for batch in tokens.values() for t in batch), tokens == reference))
        llm.engine.close()
    return rows


# ---- 2. MTP speed-up served -------------------------------------------------------------------------------------


def write_sharegpt(prompts: Iterable[Prompt], path: Path) -> int:
    """The prompts as a ShareGPT-format file (``dsv32 bench serve --dataset-name sharegpt``): the human turn is the
    rendered chat prompt, the reply the corpus's reference (bench serve reads its length only without a fixed
    ``--sharegpt-output-len``). Returns the number of prompts written."""
    entries = [{"id": f"{p.task}-{i}", "conversations": [{"from": "human", "value": p.text},
                                                          {"from": "gpt", "value": p.reference_reply}]}
               for i, p in enumerate(prompts)]
    path.write_text(json.dumps(entries, ensure_ascii=False, indent=1), encoding="utf-8")
    return len(entries)


@dataclass(frozen=True)
class ServedRun:
    """One ``bench serve`` run: server with ``k`` draft tokens (0: no speculation), at one concurrency, one round."""

    k: int
    concurrency: int
    round: int
    output_tps: float
    median_tpot_ms: float
    completed: int
    failed: int
    output_tokens: int
    acceptance_length: float | None  # from the server's /metrics over the run; None without speculation


def server_label(k: int) -> str:
    return f"MTP k={k}" if k else "no speculation"


def speedups(runs: Sequence[ServedRun]) -> dict[tuple[int, int], list[float]]:
    """Per (k, concurrency) with k > 0: output tok/s over the same round's and concurrency's no-speculation run."""
    baseline = {(r.concurrency, r.round): r.output_tps for r in runs if r.k == 0}
    ratios: dict[tuple[int, int], list[float]] = defaultdict(list)
    for run in runs:
        base = baseline.get((run.concurrency, run.round))
        if run.k and base:
            ratios[(run.k, run.concurrency)].append(run.output_tps / base)
    return dict(ratios)


def round_order(ks: Sequence[int], round_index: int) -> list[int]:
    """The servers' order in a round: rotated by one each round, so no configuration always runs first or last."""
    shift = round_index % len(ks)
    return [*ks[shift:], *ks[:shift]]


def bench_command(port: int, checkpoint: Path, dataset: Path, num_prompts: int, concurrency: int, max_tokens: int,
                  result: Path) -> list[str]:
    return [sys.executable, "-m", "dsv32.cli", "bench", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--model", MODEL_NAME, "--tokenizer", str(checkpoint), "--endpoint", "/v1/completions",
            "--dataset-name", "sharegpt", "--dataset-path", str(dataset), "--sharegpt-output-len", str(max_tokens),
            "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency), "--num-warmups", str(concurrency),
            "--extra-body", json.dumps({"add_special_tokens": False}), "--disable-tqdm",
            "--save-result", "--result-dir", str(result.parent), "--result-filename", result.name]


def server_spec(checkpoint: Path, port: int, k: int, args: argparse.Namespace) -> ServerSpec:
    extra = ["--no-enable-prefix-caching", *(["--enforce-eager"] if args.enforce_eager else [])]
    if k:
        extra += ["--speculative-config", json.dumps({"method": "mtp", "num_speculative_tokens": k})]
    return dsv32_server(checkpoint, port, extra, args.threads)


def shown(command: list[str]) -> str:
    """A command line as the report shows it (``python`` for this interpreter)."""
    return shlex.join(["python" if part == sys.executable else part for part in command])


def measure_serving(checkpoint: Path, prompts: list[Prompt], args: argparse.Namespace) -> list[ServedRun]:
    """Every round, every server in turn (its own process), ``bench serve`` at every concurrency against it; the
    commands of the first k > 0 server and its first client go to ``args.commands`` for the report."""
    dataset = args.work_dir / "heldout_sharegpt.json"
    num_prompts = write_sharegpt(prompts, dataset)
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    ks = [0, *args.serve_ks]
    runs: list[ServedRun] = []
    for round_index in range(args.repeats):
        for k in round_order(ks, round_index):
            name = f"{server_label(k)}, round {round_index + 1}"
            port = free_port()
            spec = server_spec(checkpoint, port, k, args)
            log = args.work_dir / f"serve_k{k}_round{round_index + 1}.log"
            print(f"serving: {name}", flush=True)
            with engine_turn(name, args.cores, args.busy), RunningServer(spec, port, log):
                for concurrency in args.concurrencies:
                    result_path = args.work_dir / f"bench_k{k}_c{concurrency}_round{round_index + 1}.json"
                    command = bench_command(port, checkpoint, dataset, num_prompts, concurrency, args.max_tokens,
                                            result_path)
                    if k == args.serve_ks[0]:
                        args.commands.setdefault("server", shown(spec.command))
                        args.commands.setdefault("client", shown(command))
                    run_step(command, result_path.with_suffix(".log"))
                    result = json.loads(result_path.read_text())
                    if not result["failed"] and result["total_input_tokens"] != prompt_tokens:
                        raise BenchmarkError(f"the server counted {result['total_input_tokens']} prompt tokens, the "
                                             f"chat prompts have {prompt_tokens}: it was not sent their tokens")
                    runs.append(ServedRun(k, concurrency, round_index, result["output_throughput"],
                                          result["median_tpot_ms"], result["completed"], result["failed"],
                                          result["total_output_tokens"], result.get("spec_decode_acceptance_length")))
                    print(f"  concurrency {concurrency}: {runs[-1].output_tps:.1f} output tok/s", flush=True)
    return runs


# ---- 3. DSA -----------------------------------------------------------------------------------------------------


@dataclass
class CompactNetwork:
    """The trainer's network holding a checkpoint's weights over a compact vocabulary: the tokens with an embedding
    (``token_ids``), then one column for every other token (zero embedding, the shared LM-head row, ``others`` of
    them). Exact: those tokens' embeddings are zero and their head rows identical in an exported demo checkpoint."""

    model: TrainableDeepseekV32
    token_ids: torch.Tensor
    others: int
    lookup: torch.Tensor  # real id -> compact id

    def compact(self, ids: Sequence[int]) -> torch.Tensor:
        return self.lookup[torch.tensor(ids)]

    def log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Log-probabilities over the real vocabulary of the compact columns (the last one: of each other token)."""
        logits = logits[..., :len(self.token_ids) + 1]
        weights = torch.zeros(logits.shape[-1])
        weights[-1] = math.log(self.others) if self.others else -math.inf
        return logits - torch.logsumexp(logits + weights, dim=-1, keepdim=True)


def load_network(checkpoint: Path) -> CompactNetwork:
    config = ModelConfig.from_pretrained(str(checkpoint))
    if config.tie_word_embeddings or not config.has_indexer:
        raise BenchmarkError(f"{checkpoint}: the DSA part needs a V3.2 checkpoint with its own LM head")
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(checkpoint.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    embed, head = tensors.pop("model.embed_tokens.weight").float(), tensors.pop("lm_head.weight").float()
    used = embed.abs().sum(-1).nonzero().flatten()
    unused = torch.ones(len(embed), dtype=torch.bool)
    unused[used] = False
    others = int(unused.sum())
    shared_row = head[unused.nonzero()[0, 0]] if others else torch.zeros(head.shape[1])
    model = TrainableDeepseekV32(config, len(used) + 1)
    tensors["model.embed_tokens.weight"] = torch.cat((embed[used], torch.zeros(1, embed.shape[1])))
    # The network's own extra head row ("any other token") repeats the shared one; compact column len(used) is used.
    tensors["lm_head.weight"] = torch.cat((head[used], shared_row[None], shared_row[None]))
    model.load_state_dict({name: t.float() for name, t in tensors.items()}, strict=True)
    lookup = torch.full((len(embed),), len(used), dtype=torch.long)
    lookup[used] = torch.arange(len(used))
    return CompactNetwork(model.eval(), used, others, lookup)


def head_mass(probs: torch.Tensor) -> torch.Tensor:
    """``[H, L, L]`` attention probabilities -> ``[L, L]``: summed over heads, each row normalised to 1 (the
    distribution the indexer is trained to match)."""
    mass = probs.sum(0)
    return mass / mass.sum(-1, keepdim=True)


def kept_mass(mass: torch.Tensor, selection: torch.Tensor, topk: int) -> torch.Tensor:
    """For each query that has more causal keys than ``topk`` (rows ``topk..L-1``): the share of its ``mass`` held by
    the ``topk`` keys of highest ``selection`` score (``-inf`` on future keys)."""
    rows = slice(topk, mass.shape[0])
    chosen = selection[rows].topk(topk, dim=-1).indices
    return mass[rows].gather(-1, chosen).sum(-1)


def future_keys(length: int) -> torch.Tensor:
    """``[L, L]``: True where the key comes after the query."""
    return torch.ones(length, length, dtype=torch.bool).triu(1)


def recency(length: int) -> torch.Tensor:
    """Selection scores that pick the last keys (a sliding window): the key's position, ``-inf`` on future keys."""
    return torch.arange(length, dtype=torch.float32).expand(length, length).masked_fill(future_keys(length),
                                                                                        float("-inf"))


SELECTIONS = ("indexer", "oracle", "window")


@dataclass
class RecallRecorder:
    """Forward hooks on every attention layer: the dense attention mass per query and the share of it that each
    selection keeps (``indexer``: its top-k, as sparse attention uses; ``oracle``: the mass's own top-k; ``window``:
    the last k keys), for the forwards run under each ``mode``."""

    topk: int
    mode: str = "dense"
    kept: dict[tuple[str, int, str], list[torch.Tensor]] = field(default_factory=lambda: defaultdict(list))

    def attach(self, model: TrainableDeepseekV32) -> list[torch.utils.hooks.RemovableHandle]:
        attentions = [layer.self_attn for layer in model.model.layers]
        return [attention.register_forward_hook(self._hook(i)) for i, attention in enumerate(attentions)]

    def _hook(self, layer: int) -> Callable[[MLA, tuple, object], None]:
        def hook(module: MLA, inputs: tuple, _output: object) -> None:
            x, rope = inputs[0], inputs[1]
            scores, index_scores, _ = module.attention_logits(x, rope)
            length = x.shape[1]
            if length <= self.topk:
                return
            probs = scores.masked_fill(future_keys(length), float("-inf")).softmax(-1)
            for row in range(x.shape[0]):
                mass = head_mass(probs[row].float())
                for name, selection in zip(SELECTIONS, (index_scores[row], mass, recency(length)), strict=True):
                    self.kept[(self.mode, layer, name)].append(kept_mass(mass, selection, self.topk))
        return hook

    def recall(self, mode: str, layer: int, selection: str) -> torch.Tensor:
        """Every recorded query's kept share, for one mode, layer and selection."""
        return torch.cat(self.kept[(mode, layer, selection)])


@dataclass(frozen=True)
class LogitComparison:
    """Sparse against dense attention at the pruned positions of some sequences."""

    positions: int
    max_abs: float
    mean_abs: float
    greedy_agreement: float
    dense_nll: float
    sparse_nll: float


def compare_logits(dense: torch.Tensor, sparse: torch.Tensor, dense_log_probs: torch.Tensor,
                   sparse_log_probs: torch.Tensor, next_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per position of ``[P, V]`` logits (and their log-probabilities over the real vocabulary): max and mean
    absolute logit difference, argmax agreement, and each one's loss on ``next_ids`` (the next tokens, ``[P]``)."""
    diff = (sparse - dense).abs()
    return {"max_abs": diff.amax(-1), "mean_abs": diff.mean(-1),
            "agree": (sparse.argmax(-1) == dense.argmax(-1)).float(),
            "dense_nll": -dense_log_probs.gather(-1, next_ids[:, None])[:, 0],
            "sparse_nll": -sparse_log_probs.gather(-1, next_ids[:, None])[:, 0]}


def summarize_logits(per_position: Sequence[dict[str, torch.Tensor]]) -> LogitComparison:
    values = {key: torch.cat([p[key] for p in per_position]) for key in per_position[0]}
    return LogitComparison(len(values["agree"]), values["max_abs"].max().item(), values["mean_abs"].mean().item(),
                           values["agree"].mean().item(), values["dense_nll"].mean().item(),
                           values["sparse_nll"].mean().item())


@dataclass(frozen=True)
class DsaSet:
    """One set of sequences and what was measured on it."""

    name: str
    lengths: list[int]
    recall: dict[tuple[str, int, str], tuple[float, float, int]]  # (mode, layer, selection) -> (mean, p10, queries)
    logits: LogitComparison


def long_conversations(tokenizer: Tokenizer, count: int, min_len: int, seed: int) -> list[list[int]]:
    """``count`` held-out conversations (prompt and replies, tokenized as the trainer does) of at least ``min_len``
    tokens."""
    found: list[list[int]] = []
    for example in examples(200 * count, seed, "heldout"):
        ids = tokenize(example, tokenizer).ids
        if len(ids) >= min_len:
            found.append(ids)
            if len(found) == count:
                return found
    raise BenchmarkError(f"fewer than {count} held-out conversations of {min_len}+ tokens")


def joined_conversations(tokenizer: Tokenizer, count: int, length: int, seed: int) -> list[list[int]]:
    """``count`` sequences of exactly ``length`` tokens: held-out conversations one after the other (each from its
    BOS), the last one cut."""
    stream = (tokenize(example, tokenizer).ids for example in examples(10**9, seed, "heldout"))
    sequences = []
    for _ in range(count):
        ids: list[int] = []
        while len(ids) < length:
            ids += next(stream)
        sequences.append(ids[:length])
    return sequences


def measure_dsa_set(network: CompactNetwork, name: str, sequences: list[list[int]]) -> DsaSet:
    model, topk = network.model, network.model.config.index_topk
    recorder = RecallRecorder(topk)
    handles = recorder.attach(model)
    compared = []
    try:
        for ids in sequences:
            compact = network.compact(ids)[None]
            outputs = {}
            for mode in ("dense", "sparse"):
                recorder.mode = mode
                with torch.no_grad():
                    outputs[mode] = model(compact, sparse=mode == "sparse").logits[0, topk:-1]
            columns = len(network.token_ids) + 1  # the distinct head rows
            dense, sparse = outputs["dense"][:, :columns], outputs["sparse"][:, :columns]
            compared.append(compare_logits(dense, sparse, network.log_probs(dense), network.log_probs(sparse),
                                           compact[0, topk + 1:]))
    finally:
        for handle in handles:
            handle.remove()
    recall = {}
    for key in recorder.kept:
        values = recorder.recall(*key)
        recall[key] = (values.mean().item(), values.quantile(0.1).item(), len(values))
    return DsaSet(name, [len(s) for s in sequences], recall, summarize_logits(compared))


def measure_dsa(checkpoint: Path, tokenizer: Tokenizer, args: argparse.Namespace) -> list[DsaSet]:
    network = load_network(checkpoint)
    topk = network.model.config.index_topk
    if args.dsa_min_len <= topk + 1 or args.dsa_long_len <= topk + 1:
        raise BenchmarkError(f"--dsa-min-len and --dsa-long-len must exceed index_topk + 1 = {topk + 1}")
    sets = [(f"held-out conversations of {args.dsa_min_len}+ tokens",
             long_conversations(tokenizer, args.dsa_sequences, args.dsa_min_len, DSA_SEED)),
            (f"held-out conversations joined to {args.dsa_long_len} tokens",
             joined_conversations(tokenizer, args.dsa_long_sequences, args.dsa_long_len, DSA_SEED + 1))]
    results = []
    for name, sequences in sets:
        print(f"DSA: {name} ({len(sequences)} sequences)", flush=True)
        results.append(measure_dsa_set(network, name, sequences))
    return results


# ---- the report -------------------------------------------------------------------------------------------------


def plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("s" if count != 1 else "")


def fmt(value: float, digits: int = 2) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def acceptance_markdown(rows: list[Acceptance], ks: Sequence[int], prompts_per_task: int) -> list[str]:
    width = max(ks)
    lines = [f"### MTP acceptance (offline, greedy, {prompts_per_task} held-out prompts per task)", "",
             "| task | k | drafts | acceptance length | draft acceptance rate | " +
             " | ".join(f"pos {i + 1}" for i in range(width)) + " | output tokens | same tokens as k=0 |",
             "|---|---|---|---|---|" + "---|" * width + "---|---|"]
    for row in rows:
        positions = [fmt(rate) for rate in row.per_position] + [""] * (width - row.k)
        task = f"**{row.task}**" if row.task == ALL_TASKS else row.task
        lines.append(f"| {task} | {row.k} | {row.stats.num_drafts} | {fmt(row.mean_length)} | "
                     f"{fmt(row.draft_acceptance_rate)} | {' | '.join(positions)} | {row.output_tokens} | "
                     f"{'yes' if row.same_tokens else '**no**'} |")
    return lines + ["", "Acceptance length: 1 + accepted / drafts (tokens per verify step). Position i: the share of "
                    "drafts whose first i tokens were all accepted."]


def times(spread: Spread | None) -> str:
    return f"{spread.median:.2f}x ({spread.low:.2f}-{spread.high:.2f})" if spread is not None else "n/a"


def serving_markdown(runs: list[ServedRun], args: argparse.Namespace) -> list[str]:
    ratios = speedups(runs)
    lines = [f"### MTP speed-up served ({args.num_serve_prompts} held-out chat prompts, max_tokens {args.max_tokens}, "
             f"{plural(args.repeats, 'round')}; servers' threads: {args.threads or 'every core'})", "",
             "| server | concurrency | output tok/s | speed-up vs no speculation | median TPOT ms | "
             "acceptance length (/metrics) | output tokens | failed |", "|---|---|---|---|---|---|---|---|"]
    for k in [0, *args.serve_ks]:
        for concurrency in args.concurrencies:
            mine = [r for r in runs if r.k == k and r.concurrency == concurrency]
            if not mine:
                continue
            speedup = "1 (baseline)" if not k else times(Spread.of(ratios.get((k, concurrency), [])))
            acceptance = Spread.of([r.acceptance_length for r in mine if r.acceptance_length])
            tokens = sorted({r.output_tokens for r in mine})
            lines.append(f"| {server_label(k)} | {concurrency} | {show(Spread.of([r.output_tps for r in mine]))} | "
                         f"{speedup} | {show(Spread.of([r.median_tpot_ms for r in mine]))} | "
                         f"{show(acceptance, 2) if k else '-'} | {', '.join(map(str, tokens))} | "
                         f"{sum(r.failed for r in mine)} |")
    k = args.serve_ks[0]
    return lines + ["", "Median (min-max) over the rounds; the speed-up pairs each run with the same round's "
                    "no-speculation run at the same concurrency.", "",
                    f"Server (MTP k={k}; the others differ in `num_speculative_tokens` or drop `--speculative-config`; "
                    f"port and paths of the first run): `{args.commands['server']}`", "",
                    f"Client (concurrency {args.concurrencies[0]}): `{args.commands['client']}`"]


def dsa_markdown(sets: list[DsaSet], config: ModelConfig) -> list[str]:
    layers = config.num_hidden_layers + config.num_nextn_predict_layers
    lines = [f"### DSA (index_topk {config.index_topk}; trainer's network, fp32)", ""]
    for dsa in sets:
        sizes = f"{plural(len(dsa.lengths), 'sequence')} of {min(dsa.lengths)}-{max(dsa.lengths)} tokens"
        lines += [f"**{dsa.name}**: {sizes}.", "",
                  "| layer | queries | indexer recall, dense run | p10 | best top-k (oracle) | last-k window | "
                  "indexer recall, sparse run |", "|---|---|---|---|---|---|---|"]
        for layer in range(layers):
            name = f"{layer} (MTP)" if layer >= config.num_hidden_layers else str(layer)
            if ("dense", layer, "indexer") not in dsa.recall:
                continue
            mean, p10, queries = dsa.recall[("dense", layer, "indexer")]
            oracle, window = dsa.recall[("dense", layer, "oracle")][0], dsa.recall[("dense", layer, "window")][0]
            sparse = dsa.recall[("sparse", layer, "indexer")][0]
            lines.append(f"| {name} | {queries} | {fmt(mean, 3)} | {fmt(p10, 3)} | {fmt(oracle, 3)} | "
                         f"{fmt(window, 3)} | {fmt(sparse, 3)} |")
        c = dsa.logits
        lines += ["", "| positions | max abs logit diff | mean abs logit diff | greedy agreement | next-token loss "
                  "dense | sparse |", "|---|---|---|---|---|---|",
                  f"| {c.positions} | {fmt(c.max_abs, 4)} | {fmt(c.mean_abs, 4)} | {c.greedy_agreement:.1%} | "
                  f"{fmt(c.dense_nll, 3)} | {fmt(c.sparse_nll, 3)} |", ""]
    return lines + ["Recall: the dense attention's mass (summed over heads) on the selected keys, mean over the "
                    "queries with more than index_topk causal keys (p10: their 10th percentile). Dense run: every "
                    "layer attends densely; sparse run: each layer's input comes from sparse layers below (the "
                    "served model). Logits: sparse vs dense model at the pruned positions, over the distinct LM-head "
                    "rows (tokens with an embedding, plus the row shared by all others); next-token loss over the "
                    "real vocabulary. Joined conversations run past the lengths the model was trained on."]


def render_report(args: argparse.Namespace, config: ModelConfig, acceptance: list[Acceptance] | None,
                  served: list[ServedRun] | None, dsa: list[DsaSet] | None, elapsed_s: float) -> str:
    command = "python benchmarks/demo_model.py " + " ".join(args.argv)
    lines = ["## MTP and DSA on held-out prompts (`benchmarks/demo_model.py`)", "",
             f"- Machine: {machine_description(args.cores)}; dsv32 {checkout_description()}.",
             f"- Checkpoint: `{args.checkpoint}`; command: `{command}` ({elapsed_s / 60:.1f} min).",
             *(load_lines(args.busy) if served is not None else []), ""]
    if acceptance is not None:
        lines += acceptance_markdown(acceptance, args.ks, args.prompts_per_task) + [""]
    if served is not None:
        lines += serving_markdown(served, args) + [""]
    if dsa is not None:
        lines += dsa_markdown(dsa, config) + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="the demo model's checkpoint folder")
    parser.add_argument("--output", type=Path, help="write the report section (markdown) here")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure (all)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/dsv32_demo_model"), help="logs, results, data")
    parser.add_argument("--max-tokens", type=int, default=256, help="most tokens per reply (EOS ends one sooner)")
    parser.add_argument("--prompts-per-task", type=int, default=25, help="MTP acceptance: prompts of each task")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3], help="MTP acceptance: draft lengths")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="MTP acceptance")
    parser.add_argument("--serve-ks", type=int, nargs="+", default=[1, 2], help="served draft lengths (+ none)")
    parser.add_argument("--concurrencies", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--serve-prompts", type=int, default=32, help="held-out prompts per bench serve run")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the served runs")
    parser.add_argument("--threads", type=int, default=None, help="the servers' threads (default: every core)")
    parser.add_argument("--enforce-eager", action="store_true", help="serve without compiled decode graphs")
    parser.add_argument("--dsa-sequences", type=int, default=16, help="DSA: held-out conversations")
    parser.add_argument("--dsa-min-len", type=int, default=384, help="DSA: their least length in tokens")
    parser.add_argument("--dsa-long-sequences", type=int, default=4, help="DSA: joined sequences")
    parser.add_argument("--dsa-long-len", type=int, default=1024, help="DSA: their length in tokens")
    args = parser.parse_args(argv)
    counts = (args.max_tokens, args.prompts_per_task, args.serve_prompts, args.repeats, args.dsa_sequences,
              args.dsa_long_sequences, *args.ks, *args.serve_ks, *args.concurrencies)
    if min(counts) < 1 or (args.threads is not None and args.threads < 1):
        parser.error("counts, draft lengths, concurrencies and --threads must be at least 1")
    if not (args.checkpoint / "config.json").is_file():
        parser.error(f"--checkpoint {args.checkpoint}: no config.json there")
    args.argv = sys.argv[1:] if argv is None else argv
    args.cores = len(os.sched_getaffinity(0))
    args.busy = []
    args.commands = {}
    started = time.monotonic()
    try:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        config = ModelConfig.from_pretrained(str(args.checkpoint))
        tokenizer = Tokenizer.from_pretrained(str(args.checkpoint))
        acceptance = served = dsa = None
        if "mtp" in args.parts:
            prompts = heldout_prompts(tokenizer, args.prompts_per_task, MTP_SEED, TASKS)
            acceptance = measure_acceptance(args.checkpoint, prompts, args)
        if "serve" in args.parts:
            mixed = [chat_prompt(ex, tokenizer) for ex in examples(args.serve_prompts, SERVE_SEED, "heldout")]
            args.num_serve_prompts = len(mixed)
            served = measure_serving(args.checkpoint, mixed, args)
        if "dsa" in args.parts:
            dsa = measure_dsa(args.checkpoint, tokenizer, args)
        report = render_report(args, config, acceptance, served, dsa, time.monotonic() - started)
    except (BenchmarkError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print("\n" + report)
    if args.output:
        args.output.write_text(report + "\n", encoding="utf-8")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
