"""``dsv32 train-demo``: train the small DeepSeek-V3.2 demo model on the synthetic corpus, on CPU, and export it.

The recipe, DeepSeek's at small scale:

* loss = next-token cross-entropy on the assistant's tokens + ``lambda`` x the MTP layer's (token after next)
  cross-entropy, ``lambda`` = 0.3 for the first 70% of training and 0.1 after (DeepSeek-V3 §4.2);
* DeepSeek Sparse Attention in two stages (V3.2 report §2.1): a dense stage (every query sees all causal keys) in
  which the lightning indexer learns, by KL divergence, to match the main attention's distribution (summed over
  heads) on detached inputs, then a sparse stage where each query attends only to the indexer's ``index_topk`` keys
  and the indexer keeps matching the attention over its selection;
* MoE load balance without auxiliary loss: after every step each router's ``e_score_correction_bias`` moves by
  ``--bias-update-rate`` towards the under-loaded experts (``noaux_tc``);
* AdamW, linear warm-up then cosine decay to 10%, gradient clipping at 1.0; fp32, or bf16 matmuls with ``--bf16``.

Training runs for ``--steps`` or ``--minutes``, whichever ends first; the schedule (learning rate, stages, MTP
weight) follows the fraction of that budget used. Everything is seeded; the loss curve is written as a PNG and JSON
next to the checkpoint (``dsv32.train.export``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dsv32.config import ModelConfig
from dsv32.tokenizer import Tokenizer
from dsv32.train.corpus import TASKS, Example, examples, render
from dsv32.train.export import export_checkpoint
from dsv32.train.network import TrainableDeepseekV32

MTP_WEIGHT_EARLY, MTP_WEIGHT_LATE, MTP_SWITCH = 0.3, 0.1, 0.7  # DeepSeek-V3: 0.3 then 0.1
WARMUP_SHARE = 0.03


def demo_config() -> ModelConfig:
    """The demo model: the V3.2 architecture (MLA with q/kv LoRA, indexer, 1 dense + 2 MoE layers of 16 routed
    experts, top-2 of 4 groups, a shared expert, one MTP layer) at a width that trains on 2 CPU cores."""
    return ModelConfig(
        architecture="DeepseekV32ForCausalLM", hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=128, kv_lora_rank=128,
        qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32, n_routed_experts=16, n_shared_experts=1,
        num_experts_per_tok=2, n_group=4, topk_group=2, index_n_heads=4, index_head_dim=64, index_topk=128,
        num_nextn_predict_layers=1, rope_scaling=None, quantization=None, max_position_embeddings=4096,
        torch_dtype="bfloat16")


def toy_config() -> ModelConfig:
    """A toy of the same architecture for tests: runs a step in well under a second."""
    return demo_config().with_overrides(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=2, q_lora_rank=32,
                                        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
                                        n_routed_experts=8, n_group=2, topk_group=1, index_n_heads=2,
                                        index_head_dim=32, index_topk=16, torch_dtype="float32")


CONFIGS = {"demo": demo_config, "toy": toy_config}


@dataclass
class Sequence:
    """One tokenized conversation: ``ids`` and which of them the model is trained to write."""

    ids: list[int]
    trained: list[bool]


def tokenize(example: Example, tokenizer: Tokenizer) -> Sequence:
    """Token ids of the rendered conversation, segment by segment (segments meet at special tokens). The text is the
    encoder's byte for byte; only the names a reply copies from the prompt (``Example.copied``) are tokenized as in
    the prompt where no space precedes them (``copied_name_ids``), elsewhere the tokenization is the canonical one."""
    ids: list[int] = []
    trained: list[bool] = []
    for text, is_trained in render(example).segments:
        for piece, is_name in _split_names(text, example.copied if is_trained else ()):
            piece_ids = copied_name_ids(piece, tokenizer) if is_name else tokenizer.encode(piece)
            ids += piece_ids
            trained += [is_trained] * len(piece_ids)
    return Sequence(ids, trained)


def copied_name_ids(name: str, tokenizer: Tokenizer) -> list[int]:
    """``name`` in the tokens the prompt spells it with (`` Velmora`` -> ``ĠVel m ora``), the first one without its
    space (``Vel m ora``). The canonical tokenization of ``">Velmora`` (``">V elm ora``) would make the model
    re-spell a name it has never seen; this one makes writing it a copy of the prompt's tokens."""
    spaced = tokenizer.encode(" " + name)
    first = tokenizer.convert_ids_to_tokens(spaced[:1])[0] or ""
    if first == "Ġ":
        return spaced[1:]
    bare = tokenizer.token_to_id(first[1:]) if first.startswith("Ġ") else None
    if bare is None:  # no such token without the space: spell that first piece canonically
        return tokenizer.encode(tokenizer.decode(spaced[:1]).removeprefix(" ")) + spaced[1:]
    return [bare, *spaced[1:]]


def _split_names(text: str, names: tuple[str, ...]) -> list[tuple[str, bool]]:
    """``text`` cut into pieces, ``True`` for an occurrence of one of ``names`` that no space precedes."""
    if not names:
        return [(text, False)]
    pattern = re.compile("|".join(re.escape(n) for n in sorted(set(names), key=len, reverse=True)))
    pieces: list[tuple[str, bool]] = []
    done = 0
    for match in pattern.finditer(text):
        if match.start() > 0 and text[match.start() - 1] == " ":
            continue
        pieces += [(text[done:match.start()], False), (match.group(), True)]
        done = match.end()
    pieces.append((text[done:], False))
    return [(piece, is_name) for piece, is_name in pieces if piece]


@dataclass
class Corpus:
    """The tokenized training conversations and the compact vocabulary they use (``token_ids[i]``: real id of
    compact token ``i``)."""

    sequences: list[Sequence]
    token_ids: torch.Tensor
    compact: dict[int, int] = field(default_factory=dict)

    @classmethod
    def build(cls, count: int, seed: int, tokenizer: Tokenizer, tasks: tuple[str, ...] = TASKS,
              progress: bool = True) -> Corpus:
        sequences = [tokenize(ex, tokenizer) for ex in tqdm(examples(count, seed=seed, tasks=tasks), total=count,
                                                             desc="Corpus", unit="conv", disable=not progress)]
        # BOS and EOS are always in (EOS pads batches).
        vocab = sorted({tokenizer.bos_token_id, tokenizer.eos_token_id}.union(*(s.ids for s in sequences)))
        return cls(sequences, torch.tensor(vocab), {token: i for i, token in enumerate(vocab)})

    def batches(self, token_budget: int, rng: random.Random, pad_id: int) -> Iterator[tuple[torch.Tensor,
                                                                                           torch.Tensor]]:
        """Endless ``(compact ids [B, L], trained mask [B, L])`` batches of about ``token_budget`` padded tokens,
        conversations of similar length together."""
        pad = self.compact[pad_id]
        while True:
            order = list(range(len(self.sequences)))
            rng.shuffle(order)
            batches: list[list[int]] = []
            for start in range(0, len(order), 512):
                group = sorted(order[start:start + 512], key=lambda i: len(self.sequences[i].ids))
                current: list[int] = []
                for index in group:
                    longest = max(len(self.sequences[j].ids) for j in current + [index])
                    if current and longest * (len(current) + 1) > token_budget:
                        batches.append(current)
                        current = []
                    current.append(index)
                batches.append(current)
            rng.shuffle(batches)
            for batch in batches:
                yield self._collate([self.sequences[i] for i in batch], pad)

    def _collate(self, sequences: list[Sequence], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
        length = max(len(s.ids) for s in sequences)
        ids = torch.full((len(sequences), length), pad, dtype=torch.long)
        trained = torch.zeros((len(sequences), length), dtype=torch.bool)
        for row, seq in enumerate(sequences):
            ids[row, :len(seq.ids)] = torch.tensor([self.compact[t] for t in seq.ids])
            trained[row, :len(seq.ids)] = torch.tensor(seq.trained)
        return ids, trained


@dataclass
class StepLosses:
    total: torch.Tensor
    lm: float
    mtp: float
    indexer_kl: float


def compute_losses(model: TrainableDeepseekV32, ids: torch.Tensor, trained: torch.Tensor, sparse: bool,
                   mtp_weight: float) -> StepLosses:
    """Next-token loss on the trained tokens, the MTP loss (token after next) weighted by ``mtp_weight``, and the
    indexer's KL (which trains only the indexer: its inputs are detached)."""
    out = model(ids, sparse=sparse)
    lm = _masked_cross_entropy(out.logits[:, :-1], ids[:, 1:], trained[:, 1:])
    total = lm + out.indexer_kl
    mtp = torch.zeros(())
    if out.mtp_logits is not None:
        mtp = _masked_cross_entropy(out.mtp_logits[:, :-1], ids[:, 2:], trained[:, 2:])
        total = total + mtp_weight * mtp
    return StepLosses(total, lm.item(), mtp.item(), out.indexer_kl.item())


def _masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[mask], targets[mask])


def learning_rate(base: float, progress: float) -> float:
    if progress < WARMUP_SHARE:
        return base * max(progress / WARMUP_SHARE, 0.01)
    decay = (progress - WARMUP_SHARE) / (1 - WARMUP_SHARE)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(decay, 1.0))))


@dataclass
class TrainResult:
    steps: int
    seconds: float
    tokens: int
    history: list[dict[str, float]]
    output: Path


def train(args: argparse.Namespace, progress: bool = True) -> TrainResult:
    """Build the corpus, train for the step/time budget, export the checkpoint and the loss curve."""
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = Tokenizer.from_pretrained(None)
    corpus = Corpus.build(args.corpus_size, args.seed, tokenizer, tuple(args.tasks.split(",")), progress)
    config = CONFIGS[args.config]()
    model = TrainableDeepseekV32(config, len(corpus.token_ids))
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0}],
                                  lr=args.lr, betas=(0.9, 0.95))
    batches = corpus.batches(args.batch_tokens, rng, tokenizer.eos_token_id)
    budget_s = args.minutes * 60 if args.minutes else math.inf

    def used(steps_done: int, seconds: float) -> float:
        """The share of the budget used: the schedule's clock."""
        return max(steps_done / args.steps, seconds / budget_s)

    history: list[dict[str, float]] = []
    start, cpu_start, tokens, step = time.monotonic(), time.process_time(), 0, 0
    # The bar shows the share of the budget (steps or minutes, whichever ends first) and its ETA.
    bar = tqdm(total=100.0, desc="Training", disable=not progress,
               bar_format="{l_bar}{bar}| [{elapsed}<{remaining}{postfix}]")
    while step < args.steps:
        fraction = used(step, time.monotonic() - start)
        if fraction >= 1:
            break
        sparse = fraction >= args.dense_share
        mtp_weight = MTP_WEIGHT_EARLY if fraction < MTP_SWITCH else MTP_WEIGHT_LATE
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args.lr, fraction)
        ids, trained = next(batches)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            losses = compute_losses(model, ids, trained, sparse, mtp_weight)
        optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        for moe in model.moe_blocks:
            moe.update_bias(args.bias_update_rate)
        step += 1
        tokens += ids.numel()
        seconds = time.monotonic() - start
        # CPU seconds (all threads) tell the cost on a shared machine, where wall time depends on the others' load.
        history.append({"step": step, "seconds": round(seconds, 2), "tokens": tokens,
                        "cpu_seconds": round(time.process_time() - cpu_start, 2), "lm": losses.lm,
                        "mtp": losses.mtp, "indexer_kl": losses.indexer_kl, "sparse": float(sparse)})
        bar.update(100.0 * min(used(step, seconds), 1.0) - bar.n)
        bar.set_postfix(step=step, lm=f"{losses.lm:.3f}", mtp=f"{losses.mtp:.3f}", kl=f"{losses.indexer_kl:.3f}",
                        stage="sparse" if sparse else "dense", tok_s=f"{tokens / seconds:.0f}")
    bar.close()
    seconds = time.monotonic() - start
    out = Path(args.output)
    model.eval()
    export_checkpoint(model, corpus.token_ids, out, metadata={"trained_steps": str(step), "seed": str(args.seed)})
    (out / "training_history.json").write_text(json.dumps(history) + "\n", encoding="utf-8")
    plot_losses(history, out / "loss_curve.png")
    return TrainResult(step, seconds, tokens, history, out)


def plot_losses(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps = [h["step"] for h in history]
    for key, label in (("lm", "next-token loss"), ("mtp", "MTP loss"), ("indexer_kl", "indexer KL")):
        ax.plot(steps, [h[key] for h in history], label=label, linewidth=1)
    sparse_from = next((h["step"] for h in history if h["sparse"]), None)
    if sparse_from is not None:
        ax.axvline(sparse_from, color="gray", linestyle="--", linewidth=1, label="sparse attention from here")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("dsv32 demo model training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_train_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="demo-model", help="Checkpoint folder to write (default demo-model).")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="demo",
                        help="Model size: the demo model, or a toy one for tests (default demo).")
    parser.add_argument("--steps", type=int, default=100_000, help="Most optimizer steps (default 100000).")
    parser.add_argument("--minutes", type=float, default=None, help="Time budget in minutes; training stops and the "
                        "schedule completes within it (default: none, --steps decides).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the corpus, the weights and the batches.")
    parser.add_argument("--corpus-size", type=int, default=40_000, help="Conversations generated (default 40000).")
    parser.add_argument("--tasks", default=",".join(TASKS),
                        help=f"Comma-separated corpus tasks (default all: {','.join(TASKS)}).")
    parser.add_argument("--batch-tokens", type=int, default=2048,
                        help="Padded tokens per batch (default 2048).")
    parser.add_argument("--lr", type=float, default=1e-3, help="Peak learning rate (default 1e-3).")
    parser.add_argument("--dense-share", type=float, default=0.4,
                        help="Share of the budget trained with dense attention before the sparse stage (default 0.4).")
    parser.add_argument("--bias-update-rate", type=float, default=1e-3,
                        help="noaux_tc router bias update per step (DeepSeek-V3's gamma; default 0.001).")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice).")
    parser.add_argument("--bf16", action="store_true",
                        help="Mixed precision: matmuls in bfloat16 (torch.autocast), weights and optimizer in fp32. "
                             "Faster on CPUs with AVX512-BF16/AMX; default off (fp32).")


def run_train_demo(args: argparse.Namespace) -> int:
    problems = [f"--{name.replace('_', '-')} must be positive"
                for name in ("steps", "corpus_size", "batch_tokens", "lr") if getattr(args, name) <= 0]
    if args.minutes is not None and args.minutes <= 0:
        problems.append("--minutes must be positive")
    unknown = sorted(set(args.tasks.split(",")) - set(TASKS))
    if unknown:
        problems.append(f"--tasks: unknown task(s) {', '.join(unknown)}; expected some of {', '.join(TASKS)}")
    if not 0 <= args.dense_share <= 1:
        problems.append("--dense-share must be in [0, 1]")
    try:
        import matplotlib  # noqa: F401  (the loss curve needs it; fail before training, not after)
    except ImportError:
        problems.append("the loss-curve plot needs matplotlib: pip install 'dsv32[plot]'")
    if problems:
        print(f"dsv32 train-demo: {problems[0]}", file=sys.stderr)
        return 2
    result = train(args)
    last = result.history[-1] if result.history else {}
    cpu = last.get("cpu_seconds", float("nan"))
    print(f"trained {result.steps} steps in {result.seconds / 60:.1f} min ({result.tokens / result.seconds:.0f} "
          f"tokens/s, {result.tokens / cpu:.0f} tokens per CPU-second), final next-token loss "
          f"{last.get('lm', float('nan')):.3f}; checkpoint in {result.output}")
    return 0
