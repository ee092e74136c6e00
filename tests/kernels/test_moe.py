"""Triton fused MoE (grouped GEMMs over routed pairs, SwiGLU epilogue) against the torch reference, bf16 and FP8
block-scaled weights, plus the sync-free expert alignment."""

from __future__ import annotations

import pytest
import torch

from dsv32.kernels import reference
from dsv32.kernels.fp8 import quantize_block_fp8

from .conftest import needs_triton


def _quantize_experts(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [quantize_block_fp8(e) for e in w]
    return torch.stack([q for q, _ in pairs]), torch.stack([s for _, s in pairs])


def _routing(num_tokens: int, num_experts: int, top_k: int, gen: torch.Generator):
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, top_k, generator=gen) + 0.1
    return weights, ids


@needs_triton
def test_align_pairs_groups_every_pair_once_by_expert() -> None:
    from dsv32.kernels.triton_moe import align_pairs

    gen = torch.Generator().manual_seed(0)
    _, ids = _routing(9, 6, 2, gen)
    ids[:, 0] = 4  # one crowded expert spanning several blocks
    sorted_pairs, block_expert = align_pairs(ids, 6, 4)
    num_pairs = ids.numel()
    real = sorted_pairs[sorted_pairs < num_pairs]
    assert sorted(real.tolist()) == list(range(num_pairs))
    blocks = sorted_pairs.view(-1, 4)
    for block, expert in zip(blocks, block_expert.tolist(), strict=True):
        pairs = block[block < num_pairs]
        if expert < 0:
            assert pairs.numel() == 0
        else:
            assert bool((ids.flatten()[pairs] == expert).all())
    used = int((block_expert >= 0).sum())
    counts = torch.bincount(ids.flatten(), minlength=6)
    assert used == int(((counts + 3) // 4).sum())


@needs_triton
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize(("num_tokens", "tiles"), [
    (3, {}),  # decode-sized, the default tiles
    (40, {"block_m": 16, "block_n": 128, "block_k": 128}),  # several tokens per expert and block (fewer programs)
])
def test_fused_moe_matches_reference(fp8: bool, num_tokens: int, tiles: dict, device: torch.device) -> None:
    from dsv32.kernels import triton_moe

    gen = torch.Generator().manual_seed(1)
    num_experts, hidden, inter, top_k = 8, 256, 256, 3
    x = torch.randn(num_tokens, hidden, generator=gen).to(torch.bfloat16)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=gen) * 0.05).to(torch.bfloat16)
    w2 = (torch.randn(num_experts, hidden, inter, generator=gen) * 0.05).to(torch.bfloat16)
    weights, ids = _routing(num_tokens, num_experts, top_k, gen)
    scales: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
    if fp8:
        (w13, s13), (w2, s2) = _quantize_experts(w13), _quantize_experts(w2)
        scales = (s13, s2)
    expected = reference.fused_moe(x, w13, w2, weights, ids, *scales)
    on = [t.to(device) if t is not None else None for t in (x, w13, w2, weights, ids, *scales)]
    got = triton_moe.fused_moe(*on, **tiles).cpu()
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert (got - expected).abs().max() <= 2e-2 * expected.abs().max()


@pytest.mark.parametrize(("num_tokens", "num_experts"), [(16, 4), (3, 8), (1, 8)])
@pytest.mark.parametrize("padding_factor", [0, 1000])  # 0: one GEMM pair per expert; 1000: padded batched GEMMs
def test_reference_moe_is_the_weighted_sum_of_each_tokens_experts(num_tokens: int, num_experts: int,
                                                                   padding_factor: int,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reference, "MOE_PADDING_FACTOR", padding_factor)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(num_tokens, 32, generator=gen)
    w13 = torch.randn(num_experts, 2 * 24, 32, generator=gen)
    w2 = torch.randn(num_experts, 32, 24, generator=gen)
    weights, ids = _routing(num_tokens, num_experts, 2, gen)
    expected = torch.zeros(num_tokens, 32)
    for t in range(num_tokens):
        for w, e in zip(weights[t], ids[t], strict=True):
            gate, up = (w13[e] @ x[t]).chunk(2)
            expected[t] += w * (w2[e] @ (torch.nn.functional.silu(gate) * up))
    got = reference.fused_moe(x, w13, w2, weights, ids)
    assert got.dtype == torch.float32 and got.shape == (num_tokens, 32)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4)


@needs_triton
def test_fused_moe_fp32_is_tight(device: torch.device) -> None:
    from dsv32.kernels import triton_moe

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 128, generator=gen)
    w13 = torch.randn(4, 2 * 96, 128, generator=gen) * 0.05  # intermediate 96: partial N and K tiles
    w2 = torch.randn(4, 128, 96, generator=gen) * 0.05
    weights, ids = _routing(5, 4, 2, gen)
    expected = reference.fused_moe(x, w13, w2, weights, ids)
    got = triton_moe.fused_moe(x.to(device), w13.to(device), w2.to(device), weights.to(device), ids.to(device))
    assert torch.allclose(got.cpu(), expected, rtol=1e-4, atol=1e-5)


def test_model_experts_run_fp8_weights_with_their_block_scales() -> None:
    """``Experts`` keeps e4m3 weights + scales and gives what the dequantised bf16 experts give (torch backend)."""
    from torch import nn

    from dsv32.config import tiny_config
    from dsv32.model.moe import Experts

    gen = torch.Generator().manual_seed(3)
    config = tiny_config()
    experts = Experts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size, torch.bfloat16)
    (w13, s13) = _quantize_experts(torch.randn(experts.gate_up_proj.shape, generator=gen) * 0.05)
    (w2, s2) = _quantize_experts(torch.randn(experts.down_proj.shape, generator=gen) * 0.05)
    x = torch.randn(6, config.hidden_size, generator=gen).to(torch.bfloat16)
    weights, ids = _routing(6, config.n_routed_experts, config.num_experts_per_tok, gen)
    with torch.no_grad():
        experts.gate_up_proj.copy_(reference.dequantize_experts(w13, s13, torch.bfloat16))
        experts.down_proj.copy_(reference.dequantize_experts(w2, s2, torch.bfloat16))
    expected = experts(x, weights, ids)
    experts.gate_up_proj, experts.down_proj = nn.Parameter(w13, False), nn.Parameter(w2, False)
    experts.gate_up_proj_scale_inv, experts.down_proj_scale_inv = s13, s2
    assert torch.equal(experts(x, weights, ids), expected)


@pytest.mark.parametrize(("num_tokens", "num_experts", "top_k"), [(1, 8, 2), (3, 8, 2), (4, 8, 2), (16, 8, 2)])
@pytest.mark.parametrize("fp8", [False, True])
def test_fixed_shape_moe_matches_fused_moe(num_tokens: int, num_experts: int, top_k: int, fp8: bool) -> None:
    """Both formulations of the captured graphs' MoE (gathered pairs: T * k <= E; every expert, densely weighted:
    more) give ``fused_moe``'s result."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(num_tokens, 128, generator=gen)
    w13 = torch.randn(num_experts, 2 * 128, 128, generator=gen) * 0.05
    w2 = torch.randn(num_experts, 128, 128, generator=gen) * 0.05
    scales: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
    if fp8:
        (w13, s13), (w2, s2) = _quantize_experts(w13), _quantize_experts(w2)
        scales = (s13, s2)
    weights, ids = _routing(num_tokens, num_experts, top_k, gen)
    expected = reference.fused_moe(x, w13, w2, weights, ids, *scales)
    got = reference.fused_moe_fixed_shape(x, w13, w2, weights, ids, *scales)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("num_tokens", [1, 8])
def test_fixed_shape_moe_skips_other_ranks_experts(num_tokens: int) -> None:
    """Expert parallel: ids outside this rank's ``[0, E)`` (another rank's experts) add nothing."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(num_tokens, 32, generator=gen)
    w13 = torch.randn(4, 48, 32, generator=gen)
    w2 = torch.randn(4, 32, 24, generator=gen)
    weights, ids = _routing(num_tokens, 8, 2, gen)
    ids -= 2  # this rank holds experts 2..5 of 8, as local ids 0..3
    local = (ids >= 0) & (ids < 4)
    expected = torch.zeros(num_tokens, 32)
    for t in range(num_tokens):
        for j in range(2):
            if local[t, j]:
                expected[t] += reference.fused_moe(x[t:t + 1], w13, w2, weights[t:t + 1, j:j + 1],
                                                   ids[t:t + 1, j:j + 1])[0]
    got = reference.fused_moe_fixed_shape(x, w13, w2, weights, ids)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["int8", "w8a8", "int4", "int4_zero", "int4_act_order"])
@pytest.mark.parametrize(("num_tokens", "tiles"), [(3, {}), (10, {"block_m": 16, "block_n": 32, "block_k": 32})])
def test_fused_moe_int_matches_per_pair_reference(fmt: str, num_tokens: int, tiles: dict, dtype: torch.dtype,
                                                  device: torch.device) -> None:
    """The grouped INT MoE on ``triton``-packed experts against each pair's dequantise-then-matmul; ids outside
    ``[0, E)`` (another rank's experts) add nothing."""
    _check_fused_moe_int(fmt, num_tokens, 128, 128, tiles, dtype, device)


@needs_triton
@pytest.mark.parametrize("fmt", ["int8", "w8a8"])
def test_fused_moe_int8_takes_sizes_off_the_tiles(fmt: str, device: torch.device) -> None:
    """INT8 experts have no group: hidden and intermediate sizes need not be multiples of any tile."""
    _check_fused_moe_int(fmt, 4, 200, 72, {}, torch.float32, device)


def _check_fused_moe_int(fmt: str, num_tokens: int, hidden: int, inter: int, tiles: dict, dtype: torch.dtype,
                         device: torch.device) -> None:
    from dsv32.kernels import triton_moe
    from dsv32.kernels.quant import TRITON_LAYOUT, pack, stack_packed

    from .helpers import INT_FORMATS, int_moe_reference

    gen = torch.Generator().manual_seed(num_tokens)
    num_experts, top_k = 5, 2
    quantize = INT_FORMATS[fmt]
    w13 = [quantize(torch.randn(2 * inter, hidden, generator=gen) * 0.1) for _ in range(num_experts)]
    w2 = [quantize(torch.randn(hidden, inter, generator=gen) * 0.1) for _ in range(num_experts)]
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype)
    weights, ids = _routing(num_tokens, num_experts, top_k, gen)
    ids[-1, 1] = num_experts + 2
    packed13, packed2 = (stack_packed([pack(w.to(device), dtype, TRITON_LAYOUT) for w in ws]) for ws in (w13, w2))
    got = triton_moe.fused_moe_int(x.to(device), packed13, packed2, weights.to(device), ids.to(device), **tiles).cpu()
    want = int_moe_reference(x, w13, w2, weights, ids)
    assert got.dtype == torch.float32 and got.shape == want.shape
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, atol=tol * want.abs().max().item(), rtol=tol)
