"""MoE routing against a hand-computed case, and the MoE block against an explicit per-expert sum."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv32.config import tiny_config
from dsv32.model.moe import MoE, route


def _logit(p: list[float]) -> torch.Tensor:
    t = torch.tensor(p, dtype=torch.float64)
    return torch.log(t / (1 - t)).float()[None]


def test_route_group_limited_bias_for_selection_only() -> None:
    # sigmoid scores, by group of 2: g0 [0.9, 0.1], g1 [0.6, 0.5], g2 [0.8, 0.7], g3 [0.2, 0.3]
    scores = [0.9, 0.1, 0.6, 0.5, 0.8, 0.7, 0.2, 0.3]
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, -0.5, 0.0, 0.6, 0.6])
    # biased: g0 [0.9, 0.1] -> 1.0, g1 [0.6, 0.5] -> 1.1, g2 [0.3, 0.7] -> 1.0, g3 [0.8, 0.9] -> 1.7
    # kept groups g3, g1 -> candidates 2, 3, 6, 7 (biased 0.6, 0.5, 0.8, 0.9): experts 7 and 6, although
    # expert 0 has the best unbiased score (its group is dropped)
    weights, ids = route(_logit(scores), bias, n_group=4, topk_group=2, top_k=2, normalize=True, scaling=2.5)
    order = ids[0].argsort()
    assert ids[0][order].tolist() == [6, 7]
    # weights come from the UNBIASED scores 0.2 and 0.3: renormalised to 0.4 / 0.6, times 2.5
    assert torch.allclose(weights[0][order], torch.tensor([1.0, 1.5]), atol=1e-6)


def test_route_without_normalisation_keeps_raw_scores() -> None:
    weights, ids = route(_logit([0.9, 0.1, 0.6, 0.5]), torch.zeros(4), n_group=1, topk_group=1, top_k=2,
                         normalize=False, scaling=1.0)
    assert sorted(ids[0].tolist()) == [0, 2]
    assert torch.allclose(weights[0].sort().values, torch.tensor([0.6, 0.9]), atol=1e-6)


def test_moe_equals_explicit_weighted_sum_of_experts() -> None:
    config = tiny_config()
    gen = torch.Generator().manual_seed(0)
    moe = MoE(config, torch.float32)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    x = torch.randn(7, config.hidden_size, generator=gen)
    weights, ids = moe.gate(x)
    expected = moe.shared_experts(x)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t], ids[t], strict=True):
            gate, up = (moe.experts.gate_up_proj[e] @ x[t]).chunk(2)
            expected[t] += w * (moe.experts.down_proj[e] @ (F.silu(gate) * up))
    assert torch.allclose(moe(x), expected, atol=1e-5)
