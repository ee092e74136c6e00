"""Feed-forward blocks: the dense SwiGLU MLP and the DeepSeek MoE (sigmoid, group-limited, bias-for-selection routing).

SwiGLU MLP:  ``y = W_down( silu(W_gate x) * (W_up x) )``.

MoE (``topk_method = noaux_tc``), per token ``x``::

    s      = sigmoid(x @ W_gate^T)                       # [E] router scores, fp32
    sb     = s + e_score_correction_bias                 # the bias only steers SELECTION
    gscore = sum of the top-2 of sb in each of n_group groups
    keep the topk_group best groups; sb := -inf elsewhere
    idx    = topk(sb, num_experts_per_tok)
    w      = s[idx] / sum(s[idx]) * routed_scaling_factor  # UNBIASED scores, renormalised, x2.5
    y      = sum_j w_j * Expert_{idx_j}(x) + SharedExpert(x)

No auxiliary loss, no capacity limit, no token dropping.

Tensor parallelism (see ``dsv32.distributed.parallel``): the dense MLP and the shared expert are cut along the
intermediate size (gate/up by rows, down by columns); routed experts either the same way (MoE-TP) or whole, a range
of experts per rank (EP: each rank runs only the (token, expert) pairs routed to its experts). The router is
replicated, so every rank routes identically; the partial outputs are summed by one all-reduce per block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv32.config import ModelConfig
from dsv32.distributed.parallel import SINGLE_PROCESS, ExpertRange, ParallelContext, Shard
from dsv32.kernels import get_backend, int_ops, require_int_layout
from dsv32.kernels.fp8 import FP8_DTYPE
from dsv32.kernels.quant import IntWeight, PackedIntWeight, pack, stack_packed
from dsv32.kernels.reference import fused_moe_fixed_shape
from dsv32.model.linear import Linear


class MLP(nn.Module):
    """SwiGLU over this rank's slice of the intermediate size (split over every rank). The dense layer gathers the
    ranks' tokens (data-parallel attention) and sums the partial outputs itself (``own_collectives``); the shared
    expert leaves both to its MoE block, which has the tokens gathered already."""

    def __init__(self, hidden: int, inter: int, dtype: torch.dtype, parallel: ParallelContext = SINGLE_PROCESS,
                 own_collectives: bool = True) -> None:
        super().__init__()
        shard = parallel.dense_shard
        self.parallel = parallel if own_collectives else SINGLE_PROCESS
        self.gate_proj = Linear(hidden, inter, dtype, shard)
        self.up_proj = Linear(hidden, inter, dtype, shard)
        self.down_proj = Linear(inter, hidden, dtype, shard, shard_dim=1)

    def forward(self, x: torch.Tensor, token_counts: list[int] | None = None) -> torch.Tensor:
        """``token_counts``: every rank's token count under data-parallel attention (see ``ParallelContext``)."""
        tokens = self.parallel.gather_tokens(x, token_counts)
        y = self.down_proj(F.silu(self.gate_proj(tokens)) * self.up_proj(tokens))
        return self.parallel.reduce_tokens(y, token_counts)


def route(router_logits: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int, top_k: int,
          normalize: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-limited top-k routing. ``router_logits`` ``[T, E]`` fp32 -> ``(weights [T, k] fp32, ids [T, k])``."""
    scores = router_logits.sigmoid()
    choice = scores + bias.float()
    num_tokens, num_experts = choice.shape
    if n_group > 1:
        group_scores = choice.view(num_tokens, n_group, num_experts // n_group).topk(2, dim=-1).values.sum(-1)
        kept = group_scores.topk(topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        expert_mask = group_mask.repeat_interleave(num_experts // n_group, dim=1)
        choice = choice.masked_fill(~expert_mask, float("-inf"))
    ids = choice.topk(top_k, dim=-1, sorted=False).indices
    weights = scores.gather(1, ids)
    if normalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scaling, ids


class Gate(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # Routing runs in fp32 (as HF and DeepSeek do): the weight is kept in fp32, not converted every step.
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size, dtype=torch.float32),
                                   requires_grad=False)
        self.e_score_correction_bias = nn.Parameter(torch.zeros(config.n_routed_experts, dtype=torch.float32),
                                                    requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        logits = F.linear(x.float(), self.weight)
        return route(logits, self.e_score_correction_bias, c.n_group, c.topk_group, c.num_experts_per_tok,
                     c.norm_topk_prob, c.routed_scaling_factor)


FP8_BLOCK = 128  # the expert kernels' (square) FP8 weight block


class Experts(nn.Module):
    """This rank's routed experts, stacked: ``gate_up_proj`` ``[E, 2I, H]`` (gate rows, then up rows), ``down_proj``
    ``[E, H, I]``, where ``E`` is ``experts.count`` (all of them without EP) and ``I`` this rank's part
    ``inter_shard`` of the intermediate size."""

    def __init__(self, num_experts: int, hidden: int, inter: int, dtype: torch.dtype,
                 experts: ExpertRange | None = None, inter_shard: Shard | None = None) -> None:
        super().__init__()
        self.experts = experts or ExpertRange(0, num_experts)
        self.inter_shard = inter_shard or Shard(0, 1)
        self.full_inter = inter
        self.total_experts = num_experts
        self.is_expert_slice = self.experts.count < num_experts
        self.dtype = dtype  # the compute dtype, also when the weights are kept in e4m3 or integers
        num_experts, inter = self.experts.count, self.inter_shard.local(inter)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden, dtype=dtype), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inter, dtype=dtype), requires_grad=False)
        # Experts kept in e4m3 carry their 128x128 block multipliers here ([E, 2I/128, H/128] and [E, H/128, I/128]);
        # None while the weights are in the compute dtype.
        self.register_buffer("gate_up_proj_scale_inv", None, persistent=False)
        self.register_buffer("down_proj_scale_inv", None, persistent=False)
        # Experts quantised to INT8 / INT4 (``quantize``): both stacks packed for the integer kernels, the
        # compute-dtype parameters then empty.
        self.gate_up_int: PackedIntWeight | None = None
        self.down_int: PackedIntWeight | None = None

    def quantize(self, gate_up: list[IntWeight], down: list[IntWeight]) -> None:
        """Hold every expert as INT8 / INT4 codes: ``gate_up[e]`` of ``[2I, H]`` (gate rows then up rows),
        ``down[e]`` of ``[H, I]``, one per expert of this rank; moved to this module's device, packed in its layout
        (``dsv32.kernels.int_weight_layout``) and stacked, the compute-dtype stacks released."""
        for name, weights in (("gate_up_proj", gate_up), ("down_proj", down)):
            param = getattr(self, name)
            expected = tuple(param.shape[1:])
            if len(weights) != param.shape[0] or any(w.shape != expected for w in weights):
                raise ValueError(f"quantised {name}: expected {param.shape[0]} experts of {expected}")
        dtype, device = self.dtype, self.gate_up_proj.device
        layout = require_int_layout(device)
        self.gate_up_int = stack_packed([pack(w.to(device), dtype, layout) for w in gate_up])
        self.down_int = stack_packed([pack(w.to(device), dtype, layout) for w in down])
        for name in ("gate_up_proj", "down_proj"):
            setattr(self, name, nn.Parameter(torch.empty(0, dtype=dtype, device=getattr(self, name).device),
                                             requires_grad=False))
            setattr(self, f"{name}_scale_inv", None)

    def to_fp8(self, name: str) -> None:
        """Store ``name`` (``gate_up_proj`` or ``down_proj``) as e4m3 with 128x128 block multipliers, both left to be
        filled. The stacked ``[gate; up]`` rows only split into whole blocks when ``I`` is a multiple of 128 (else
        one scale block would straddle gate and up rows, which carry different multipliers): refused otherwise."""
        param = getattr(self, name)
        num_experts, rows, cols = param.shape
        if name == "gate_up_proj" and (rows // 2) % FP8_BLOCK:
            raise ValueError(f"moe_intermediate_size {rows // 2} is not a multiple of {FP8_BLOCK}: the stacked gate/up "
                             f"FP8 block scales cannot be represented")
        setattr(self, name, nn.Parameter(torch.empty(param.shape, dtype=FP8_DTYPE, device=param.device),
                                         requires_grad=False))
        setattr(self, f"{name}_scale_inv", torch.zeros(num_experts, -(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK),
                                                       dtype=torch.float32, device=param.device))

    def full_shape(self, name: str) -> tuple[int, int, int]:
        """Shape of the stacked ``name`` over every expert at the full intermediate size."""
        _, rows, cols = getattr(self, name).shape
        if name == "down_proj":
            return self.total_experts, rows, self.full_inter
        return self.total_experts, 2 * self.full_inter, cols

    def narrow_full(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of the full stacked ``name`` (``[n_routed_experts, 2I, H]`` or ``[.., H, I]``)."""
        local = full.narrow(0, self.experts.first, self.experts.count)
        shard = self.inter_shard
        if shard.size == 1:
            return local
        bounds = shard.bounds(self.full_inter)
        if name == "down_proj":
            return local.narrow(2, *bounds)
        gate, up = local.split(self.full_inter, dim=1)
        return torch.cat((gate.narrow(1, *bounds), up.narrow(1, *bounds)), dim=1)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Routed-expert output ``[T, hidden]`` fp32 (this rank's experts' share): grouped GEMMs over the tokens each
        expert got (``dsv32.kernels``: fused Triton kernels on CUDA, a per-expert loop in torch elsewhere; INT8 / INT4
        experts: their layout's kernels, the grouped Triton INT MoE or the CPU packed kernels per expert)."""
        if x.shape[0] == 0:
            return x.new_zeros(x.shape, dtype=torch.float32)
        if torch.compiler.is_compiling():  # a captured decode graph: shapes must not depend on the routing
            local_ids = ids - self.experts.first
            if self.gate_up_int is not None:
                return int_ops(self.gate_up_int.layout).fused_moe_int_fixed_shape(x, self.gate_up_int, self.down_int,
                                                                                  weights, local_ids)
            return fused_moe_fixed_shape(x, self.gate_up_proj, self.down_proj, weights, local_ids,
                                         self.gate_up_proj_scale_inv, self.down_proj_scale_inv)
        if not self.is_expert_slice:
            return self._grouped(x, weights, ids)
        # Expert parallel: only the (token, slot) pairs routed to this rank's experts, then summed per token.
        local_ids = ids - self.experts.first
        tokens, slots = ((local_ids >= 0) & (local_ids < self.experts.count)).nonzero(as_tuple=True)
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        if tokens.numel():
            out.index_add_(0, tokens, self._grouped(x[tokens], weights[tokens, slots, None],
                                                    local_ids[tokens, slots, None]))
        return out

    def _grouped(self, x: torch.Tensor, weights: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        """Rows ``x`` through this rank's experts ``local_ids`` [T, k] (all valid), weighted and summed: fp32."""
        if self.gate_up_int is not None:
            return int_ops(self.gate_up_int.layout).fused_moe_int(x, self.gate_up_int, self.down_int, weights,
                                                                  local_ids)
        return get_backend(x.device).fused_moe(x, self.gate_up_proj, self.down_proj, weights, local_ids,
                                               self.gate_up_proj_scale_inv, self.down_proj_scale_inv)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, parallel: ParallelContext = SINGLE_PROCESS) -> None:
        super().__init__()
        self.parallel = parallel
        self.gate = Gate(config)
        self.experts = Experts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size, dtype,
                               parallel.expert_range(config.n_routed_experts), parallel.moe_shard)
        self.shared_experts = (MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts, dtype,
                                   parallel, own_collectives=False) if config.n_shared_experts else None)

    def forward(self, x: torch.Tensor, token_counts: list[int] | None = None) -> torch.Tensor:
        """Every rank's experts see every token (data-parallel attention: the ranks' tokens, ``token_counts`` of
        them, are gathered first); their partial sums and the shared expert's are summed over the ranks in one
        all-reduce, and each rank keeps its own tokens' rows."""
        tokens = self.parallel.gather_tokens(x, token_counts)
        weights, ids = self.gate(tokens)
        y = self.experts(tokens, weights, ids)
        if self.shared_experts is not None:
            y = y + self.shared_experts(tokens).float()
        return self.parallel.reduce_tokens(y, token_counts).to(x.dtype)
