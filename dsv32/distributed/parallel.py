"""The model's view of parallelism: which part of each weight this rank holds, and the collectives that join the
parts' partial results.

One model runs over ``world_size`` ranks (one per device), in one of two layouts (as vLLM and SGLang run DeepSeek):

Tensor parallel (``-tp N``): attention and the dense layers are split over every rank (``tp_size = world_size``)
and every rank runs every token.

* ``q_b_proj`` / ``kv_b_proj`` column-parallel by head, ``o_proj`` row-parallel (its partial sums all-reduced);
  ``q_a_proj``, ``kv_a_proj_with_mqa``, their norms and the lightning indexer replicated; every rank writes and
  keeps the whole latent cache (the latent is shared by every head).
* dense MLP and shared expert: gate/up column-parallel, down row-parallel.
* embedding and LM head vocab-parallel (``ceil(vocab / tp_size)`` rows each, the last part zero-padded): the
  embedding's partial lookups are all-reduced, the logits all-gathered (every rank gets them; the driver samples).

Data-parallel attention (``-dp N``; SGLang's ``--tp N --dp N --enable-dp-attention``): attention, indexer and
embedding replicated (``tp_size = 1``); each rank runs only the tokens of its own sequences and keeps only their
cache, so the ranks together hold N times the tokens. The dense MLP, the shared expert and the LM head stay split
over every rank, as SGLang keeps them by default: around each dense MLP and MoE the ranks' tokens are gathered
(padded to the largest count), every rank runs its part on all of them, and the all-reduced sums are cut back to each
rank's rows; the head runs on the gathered final hidden states. A rank with no sequence this step runs those on
nothing of its own and still joins every collective.

Routed experts, in both: either cut along ``moe_intermediate_size`` over every rank (MoE-TP), or with expert
parallelism (``--enable-expert-parallel``) ``n_routed_experts / world_size`` whole experts per rank, each rank running
only the (token, expert) pairs routed to its experts. Each rank's MoE output is a partial sum; one all-reduce joins
them.

A ``Shard`` says which slice of the full (checkpoint-layout) tensor a parameter holds; the loader reads exactly that
slice and dummy weights are generated at full shape and then cut the same way, so every layout is the same model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from dsv32.config import BLOCK_SCALED_QUANTIZATION, ConfigError, ModelConfig


@dataclass(frozen=True)
class Shard:
    """Part ``rank`` of ``size`` equal parts of a tensor dimension (the last part may be short: vocab padding)."""

    rank: int
    size: int

    def local(self, full: int) -> int:
        """Rows this part holds (padded: every part is the same size)."""
        return -(-full // self.size)

    def bounds(self, full: int) -> tuple[int, int]:
        """``(start, count)`` of the real rows of ``full`` this part holds (``count`` < ``local`` when padded)."""
        local = self.local(full)
        start = self.rank * local
        return start, max(0, min(local, full - start))


@dataclass(frozen=True)
class ExpertRange:
    """The routed experts ``first .. first + count - 1`` held by this rank (all of them without EP)."""

    first: int
    count: int

    def contains(self, expert: int) -> bool:
        return self.first <= expert < self.first + self.count


@dataclass(frozen=True)
class ParallelContext:
    """This rank's place in the model's parallel layout and the collectives over its group (immutable: what changes
    per step, each rank's token count under data-parallel attention, comes with the step's batch).

    ``world_size`` ranks (``group``: their ``torch.distributed`` process group; ``None``: one process, every collective
    is the identity). Two layouts:

    * tensor parallel (default): attention and embedding split over all ranks (``tp_size`` = ``world_size``),
      every rank runs every token;
    * data-parallel attention (``data_parallel``, SGLang's ``--enable-dp-attention``): attention and embedding
      replicated (``tp_size`` = 1), each rank runs only its own sequences' tokens and keeps only their cache.

    Either way the dense MLP, the shared expert and the LM head are split over all ranks (``dense_shard``; their
    inputs gathered first under data-parallel attention), and so are the routed experts: whole experts with
    ``expert_parallel``, else along ``moe_intermediate_size``.
    """

    rank: int = 0
    world_size: int = 1
    expert_parallel: bool = False
    group: dist.ProcessGroup | None = None
    data_parallel: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside a group of {self.world_size}")
        # One rank has nothing to split: both layouts are the plain model.
        object.__setattr__(self, "expert_parallel", self.expert_parallel and self.world_size > 1)
        object.__setattr__(self, "data_parallel", self.data_parallel and self.world_size > 1)

    @property
    def tp_rank(self) -> int:
        return 0 if self.data_parallel else self.rank

    @property
    def tp_size(self) -> int:
        return 1 if self.data_parallel else self.world_size

    @property
    def tp_shard(self) -> Shard:
        """How attention and the embedding are cut (not at all under data-parallel attention)."""
        return Shard(self.tp_rank, self.tp_size)

    @property
    def dense_shard(self) -> Shard:
        """How the dense MLP, the shared expert and the LM head are cut: over every rank."""
        return Shard(self.rank, self.world_size)

    def expert_range(self, num_experts: int) -> ExpertRange:
        if not self.expert_parallel:
            return ExpertRange(0, num_experts)
        count = num_experts // self.world_size
        return ExpertRange(self.rank * count, count)

    @property
    def moe_shard(self) -> Shard:
        """How routed experts are cut along ``moe_intermediate_size``: whole under EP, else over every rank."""
        return Shard(0, 1) if self.expert_parallel else Shard(self.rank, self.world_size)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` over the tensor-parallel ranks, in place (the partial results of a split layer)."""
        if self.tp_size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` concatenated along the last dimension, in rank order (the LM head's vocab slices)."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    # ---- data-parallel attention: the MoE sees every rank's tokens ------------------------------------------------
    # ``token_counts``: how many tokens each rank runs in this forward (``ForwardBatch.rank_token_counts``, known to
    # every rank); None without data-parallel attention.
    def gather_tokens(self, x: torch.Tensor, token_counts: list[int] | None) -> torch.Tensor:
        """Every rank's rows of ``x`` (this rank's ``[T_r, ...]``), rank after rank: ``[sum T, ...]``. Without
        data-parallel attention every rank has every token already: ``x`` itself."""
        if not self.data_parallel:
            return x
        counts = _counts(token_counts)
        padded = x.new_zeros((max(counts), *x.shape[1:]))
        padded[:x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])

    def reduce_tokens(self, y: torch.Tensor, token_counts: list[int] | None) -> torch.Tensor:
        """The sum over ranks of per-token partial results ``y`` (of ``gather_tokens``' rows), this rank's rows."""
        if not self.data_parallel:
            if self.world_size > 1:
                dist.all_reduce(y, group=self.group)
            return y
        dist.all_reduce(y, group=self.group)
        counts = _counts(token_counts)
        start = sum(counts[:self.rank])
        return y[start:start + counts[self.rank]]


def _counts(token_counts: list[int] | None) -> list[int]:
    if token_counts is None:
        raise ValueError("data-parallel attention needs each rank's token count (ForwardBatch.rank_token_counts)")
    return token_counts


SINGLE_PROCESS = ParallelContext()

TP_FLAG = "--tensor-parallel-size"
DP_FLAG = "--data-parallel-size"


def validate_layout(config: ModelConfig, world_size: int, expert_parallel: bool, fp8_weights: bool,
                    data_parallel: bool = False) -> None:
    """Refuse a layout that does not split the model evenly, naming the flag: heads and intermediate sizes must
    divide by the tensor-parallel size, experts by the EP size, and with block-scaled weights (a checkpoint in FP8 or
    ``blockwise_int8``) every shard must hold whole 128x128 blocks (its block scales then split with it)."""
    if world_size < 1:
        raise ConfigError(f"{TP_FLAG} must be >= 1, got {world_size}")
    if world_size == 1:
        return
    c = config
    flag = f"{DP_FLAG if data_parallel else TP_FLAG} {world_size}"
    tp_size = 1 if data_parallel else world_size  # attention's split; the dense parts are split world_size ways

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ConfigError(f"{flag}{' with --enable-expert-parallel' if expert_parallel else ''}: {what}")

    need(c.num_attention_heads % tp_size == 0,
         f"num_attention_heads = {c.num_attention_heads} is not divisible by {tp_size}")
    need(c.intermediate_size % world_size == 0,
         f"intermediate_size = {c.intermediate_size} is not divisible by {world_size}")
    shared = c.moe_intermediate_size * c.n_shared_experts
    if c.n_routed_experts:
        need(shared % world_size == 0,
             f"the shared expert's {shared} intermediate rows are not divisible by {world_size}")
        if expert_parallel:
            need(c.n_routed_experts % world_size == 0,
                 f"n_routed_experts = {c.n_routed_experts} is not divisible by {world_size} expert-parallel ranks")
        else:
            need(c.moe_intermediate_size % world_size == 0,
                 f"moe_intermediate_size = {c.moe_intermediate_size} is not divisible by {world_size}")
    if c.quantization is None or c.quantization.quant_method not in BLOCK_SCALED_QUANTIZATION or not fp8_weights:
        return
    block_rows, block_cols = c.quantization.weight_block_size
    heads = c.num_attention_heads // tp_size
    splits = {"intermediate_size": (c.intermediate_size // world_size, min(block_rows, block_cols))}
    if tp_size > 1:
        splits.update({"q_b_proj rows (heads x qk_head_dim)": (heads * c.qk_head_dim, block_rows),
                       "kv_b_proj rows (heads x (nope + v))": (heads * (c.qk_nope_head_dim + c.v_head_dim),
                                                               block_rows),
                       "o_proj columns (heads x v_head_dim)": (heads * c.v_head_dim, block_cols)})
    if c.n_routed_experts:
        splits["shared expert intermediate"] = (shared // world_size, min(block_rows, block_cols))
    if c.n_routed_experts and not expert_parallel:
        splits["moe_intermediate_size"] = (c.moe_intermediate_size // world_size, min(block_rows, block_cols))
    for what, (size, block) in splits.items():
        need(size % block == 0, f"each rank's {what} = {size} is not a multiple of the FP8 weight block ({block}), "
                                "so the block scales cannot be split with the weights")
