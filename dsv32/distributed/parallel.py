"""The model's view of parallelism: which part of each weight this rank holds, and the collectives that join the
parts' partial results.

One model runs over ``world_size`` ranks (one per device). Attention and the dense layers are tensor-parallel over
all of them (``tp_size = world_size``), as vLLM and SGLang shard DeepSeek:

* ``q_b_proj`` / ``kv_b_proj`` column-parallel by head, ``o_proj`` row-parallel (its partial sums all-reduced);
  ``q_a_proj``, ``kv_a_proj_with_mqa``, their norms and the lightning indexer replicated; every rank writes and
  keeps the whole latent cache (the latent is shared by every head).
* dense MLP and shared expert: gate/up column-parallel, down row-parallel.
* routed experts: with ``ep_size == 1`` every rank holds every expert cut along ``moe_intermediate_size``
  (MoE-TP); with expert parallelism (``ep_size == world_size``) ``n_routed_experts / ep_size`` whole experts. Either
  way each rank's MoE output (routed + shared) is a partial sum, joined by one all-reduce.
* embedding and LM head vocab-parallel (``ceil(vocab / tp_size)`` rows each, the last part zero-padded): the
  embedding's partial lookups are all-reduced, the logits all-gathered (every rank gets them; the driver samples).

A ``Shard`` says which slice of the full (checkpoint-layout) tensor a parameter holds; the loader reads exactly that
slice and dummy weights are generated at full shape and then cut the same way, so every layout is the same model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from dsv32.config import ConfigError, ModelConfig


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


class ParallelContext:
    """This rank's place in the model's parallel layout and the collectives over its group.

    ``group`` is the ``torch.distributed`` process group of the model's ranks (``None``: one process, every collective
    is the identity)."""

    def __init__(self, tp_rank: int = 0, tp_size: int = 1, expert_parallel: bool = False,
                 group: dist.ProcessGroup | None = None) -> None:
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"rank {tp_rank} outside a tensor-parallel group of {tp_size}")
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.expert_parallel = expert_parallel and tp_size > 1
        self.group = group

    @property
    def tp_shard(self) -> Shard:
        return Shard(self.tp_rank, self.tp_size)

    @property
    def ep_size(self) -> int:
        return self.tp_size if self.expert_parallel else 1

    def expert_range(self, num_experts: int) -> ExpertRange:
        if not self.expert_parallel:
            return ExpertRange(0, num_experts)
        count = num_experts // self.tp_size
        return ExpertRange(self.tp_rank * count, count)

    @property
    def moe_shard(self) -> Shard:
        """How routed experts are cut along ``moe_intermediate_size``: whole under EP, else like the dense layers."""
        return Shard(0, 1) if self.expert_parallel else self.tp_shard

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` over the ranks, in place."""
        if self.tp_size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """The ranks' ``x`` concatenated along the last dimension, in rank order."""
        if self.tp_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.tp_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


SINGLE_PROCESS = ParallelContext()

TP_FLAG = "--tensor-parallel-size"


def validate_layout(config: ModelConfig, tp_size: int, expert_parallel: bool, fp8_weights: bool) -> None:
    """Refuse a layout that does not split the model evenly, naming the flag: heads and intermediate sizes must
    divide by ``tp_size``, experts by the EP size, and with FP8 weights (a checkpoint with a
    ``quantization_config``) every shard must hold whole 128x128 blocks (its block scales then split with it)."""
    if tp_size < 1:
        raise ConfigError(f"{TP_FLAG} must be >= 1, got {tp_size}")
    if tp_size == 1:
        return
    c = config

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ConfigError(f"{TP_FLAG} {tp_size}{' with --enable-expert-parallel' if expert_parallel else ''}: "
                              f"{what}")

    need(c.num_attention_heads % tp_size == 0,
         f"num_attention_heads = {c.num_attention_heads} is not divisible by {tp_size}")
    need(c.intermediate_size % tp_size == 0, f"intermediate_size = {c.intermediate_size} is not divisible by {tp_size}")
    shared = c.moe_intermediate_size * c.n_shared_experts
    if c.n_routed_experts:
        need(shared % tp_size == 0, f"the shared expert's {shared} intermediate rows are not divisible by {tp_size}")
        if expert_parallel:
            need(c.n_routed_experts % tp_size == 0,
                 f"n_routed_experts = {c.n_routed_experts} is not divisible by {tp_size} expert-parallel ranks")
        else:
            need(c.moe_intermediate_size % tp_size == 0,
                 f"moe_intermediate_size = {c.moe_intermediate_size} is not divisible by {tp_size}")
    if c.quantization is None or not fp8_weights:
        return
    block_rows, block_cols = c.quantization.weight_block_size
    heads = c.num_attention_heads // tp_size
    splits = {"q_b_proj rows (heads x qk_head_dim)": (heads * c.qk_head_dim, block_rows),
              "kv_b_proj rows (heads x (nope + v))": (heads * (c.qk_nope_head_dim + c.v_head_dim), block_rows),
              "o_proj columns (heads x v_head_dim)": (heads * c.v_head_dim, block_cols),
              "intermediate_size": (c.intermediate_size // tp_size, min(block_rows, block_cols))}
    if c.n_routed_experts:
        splits["shared expert intermediate"] = (shared // tp_size, min(block_rows, block_cols))
        if not expert_parallel:
            splits["moe_intermediate_size"] = (c.moe_intermediate_size // tp_size, min(block_rows, block_cols))
    for what, (size, block) in splits.items():
        need(size % block == 0, f"each rank's {what} = {size} is not a multiple of the FP8 weight block ({block}), "
                                "so the block scales cannot be split with the weights")
