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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv32.config import ModelConfig
from dsv32.kernels import get_backend
from dsv32.kernels.fp8 import FP8_DTYPE
from dsv32.model.linear import Linear


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden, inter, dtype)
        self.up_proj = Linear(hidden, inter, dtype)
        self.down_proj = Linear(inter, hidden, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def route(router_logits: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int, top_k: int,
          normalize: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-limited top-k routing. ``router_logits`` ``[T, E]`` fp32 -> ``(weights [T, k] fp32, ids [T, k])``."""
    scores = router_logits.sigmoid()
    choice = scores + bias.float()
    num_tokens, num_experts = choice.shape
    if n_group > 1:
        group_scores = choice.view(num_tokens, n_group, -1).topk(2, dim=-1).values.sum(-1)
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
    """All routed experts, stacked: ``gate_up_proj`` ``[E, 2I, H]`` (gate rows, then up rows), ``down_proj``
    ``[E, H, I]``."""

    def __init__(self, num_experts: int, hidden: int, inter: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden, dtype=dtype), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inter, dtype=dtype), requires_grad=False)
        # Experts kept in e4m3 carry their 128x128 block multipliers here ([E, 2I/128, H/128] and [E, H/128, I/128]);
        # None while the weights are in the compute dtype.
        self.register_buffer("gate_up_proj_scale_inv", None, persistent=False)
        self.register_buffer("down_proj_scale_inv", None, persistent=False)

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

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Routed-expert output ``[T, hidden]`` fp32: grouped GEMMs over the tokens each expert got
        (``dsv32.kernels``: fused Triton kernels on CUDA, a per-expert loop in torch elsewhere)."""
        return get_backend(x.device).fused_moe(x, self.gate_up_proj, self.down_proj, weights, ids,
                                               self.gate_up_proj_scale_inv, self.down_proj_scale_inv)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate = Gate(config)
        self.experts = Experts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size, dtype)
        self.shared_experts = (MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts, dtype)
                               if config.n_shared_experts else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        y = self.experts(x, weights, ids)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x).float()
        return y.to(x.dtype)
