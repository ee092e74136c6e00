"""INT8 / INT4 weight-only kernels (CPU packed ``aten`` kernels) against the plain dequantise-then-matmul reference:
linear layers in each format (per-channel INT8, W8A8 dynamic activations, INT4 symmetric, with zero points, with
act-order ``g_idx``) and the grouped / fixed-shape MoE over INT experts."""

from __future__ import annotations

import pytest
import torch

from dsv32.kernels import reference
from dsv32.kernels.quant import (
    MANY_ROWS,
    IntWeight,
    dequantize,
    int_linear,
    narrow_int_weight,
    pack,
    packable_codes,
    quantize_int4,
    quantize_int8,
    reference_linear,
    stack_packed,
    widen,
    widenable,
)

from .helpers import act_order, int_moe_reference


def _weight(rows: int, cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # rows of very different magnitude, so a per-channel or per-group scale matters
    return torch.randn(rows, cols, generator=gen) * torch.logspace(-2, 0, rows)[:, None]


def _formats(rows: int, cols: int) -> dict[str, IntWeight]:
    w = _weight(rows, cols, 0)
    int4_zero = quantize_int4(w, 64, symmetric=False)
    return {"int8": quantize_int8(w), "w8a8": quantize_int8(w, act_quant=True),
            "int4_sym": quantize_int4(w, 128), "int4_zero": int4_zero, "int4_act_order": act_order(int4_zero)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["int8", "w8a8", "int4_sym", "int4_zero", "int4_act_order"])
@pytest.mark.parametrize("rows", [1, 5, 33])
def test_int_linear_matches_dequantized_reference(fmt: str, dtype: torch.dtype, rows: int) -> None:
    weight = _formats(96, 256)[fmt]
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows)).to(dtype)
    got = int_linear(x, pack(weight, dtype))
    want = reference_linear(x, weight)
    tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol * want.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("fmt", ["int8", "int4_sym", "int4_zero", "int4_act_order"])
def test_widened_packed_weight_is_the_dequantized_weight(fmt: str) -> None:
    weight = _formats(128, 256)[fmt]
    packed = pack(weight, torch.float32)
    assert widenable(packed)
    want = dequantize(weight)
    if packed.perm is not None:  # the packed columns are in act order
        want = want[:, packed.perm]
    torch.testing.assert_close(widen(packed, torch.float32), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["int8", "w8a8", "int4_sym", "int4_zero", "int4_act_order"])
def test_many_rows_take_the_widened_gemm_and_match_the_reference(fmt: str, dtype: torch.dtype) -> None:
    weight = _formats(128, 256)[fmt]
    x = torch.randn(MANY_ROWS + 5, 256, generator=torch.Generator().manual_seed(2)).to(dtype)
    got = int_linear(x, pack(weight, dtype))
    want = reference_linear(x, weight)
    tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol * want.abs().max().item(), rtol=tol)


def test_quantize_round_trips_within_half_a_step() -> None:
    w = _weight(64, 256, 1)
    int8 = quantize_int8(w)
    assert (dequantize(int8) - w).abs().le(int8.scale[:, None] / 2 + 1e-7).all()
    for symmetric in (True, False):
        int4 = quantize_int4(w, 128, symmetric)
        assert int4.q.max() <= 15 and int4.q.min() >= 0
        step = int4.scale.repeat_interleave(128, dim=1)
        assert (dequantize(int4) - w).abs().le(step / 2 + 1e-6).all()


def test_act_order_is_the_same_weight_as_stored() -> None:
    weight = _formats(32, 256)["int4_act_order"]
    dense = dequantize(weight)
    groups = weight.g_idx.long()
    k = 7
    expected = (weight.q[:, k].float() - weight.zero[:, groups[k]]) * weight.scale[:, groups[k]]
    torch.testing.assert_close(dense[:, k], expected)


@pytest.mark.parametrize("fmt", ["int8", "w8a8", "int4_sym", "int4_zero", "int4_act_order"])
@pytest.mark.parametrize(("dim", "start", "count"), [(0, 32, 32), (1, 128, 128), (1, 64, 64), (1, 32, 160)])
def test_a_ranks_part_of_the_codes_is_that_part_of_the_weight(fmt: str, dim: int, start: int, count: int) -> None:
    weight = _formats(96, 256)[fmt]
    part = narrow_int_weight(weight, dim, start, count)
    want = dequantize(weight).narrow(dim, start, count)
    torch.testing.assert_close(dequantize(part), want, atol=0, rtol=0)
    # whole groups (or any rows) stay packable; a cut through INT4 groups is not
    cut_groups = fmt.startswith("int4") and dim == 1 and (start % weight.group_size or count % weight.group_size)
    assert packable_codes(part) == (not cut_groups and (fmt != "int4_act_order" or dim == 0))
    if packable_codes(part):
        x = torch.randn(3, part.shape[1])
        torch.testing.assert_close(int_linear(x, pack(part, torch.float32)), reference_linear(x, part),
                                   atol=1e-4, rtol=1e-4)


def test_unpackable_int4_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="N % 16"):
        pack(quantize_int4(torch.randn(24, 128), 128), torch.float32)


@pytest.mark.parametrize("fmt", ["int8", "w8a8", "int4"])
@pytest.mark.parametrize("num_tokens", [1, 3, 12])
def test_int_moe_matches_per_pair_reference(fmt: str, num_tokens: int) -> None:
    num_experts, hidden, inter, top_k = 6, 128, 128, 2
    gen = torch.Generator().manual_seed(num_tokens)
    quantize = {"int8": quantize_int8, "w8a8": lambda w: quantize_int8(w, act_quant=True), "int4": quantize_int4}[fmt]
    w13 = [quantize(torch.randn(2 * inter, hidden, generator=gen) * 0.1) for _ in range(num_experts)]
    w2 = [quantize(torch.randn(hidden, inter, generator=gen) * 0.1) for _ in range(num_experts)]
    x = torch.randn(num_tokens, hidden, generator=gen)
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, top_k, generator=gen)
    packed13 = stack_packed([pack(w, torch.float32) for w in w13])
    packed2 = stack_packed([pack(w, torch.float32) for w in w2])
    want = int_moe_reference(x, w13, w2, weights, ids)
    torch.testing.assert_close(reference.fused_moe_int(x, packed13, packed2, weights, ids), want, atol=1e-4, rtol=1e-4)
    fixed = reference.fused_moe_int_fixed_shape(x, packed13, packed2, weights, ids)
    torch.testing.assert_close(fixed, want, atol=1e-4, rtol=1e-4)
    # ids outside [0, E) (another rank's experts) contribute nothing in the fixed-shape form
    other_rank = ids.clone()
    other_rank[:, 1] = num_experts + 1
    torch.testing.assert_close(reference.fused_moe_int_fixed_shape(x, packed13, packed2, weights, other_rank),
                               int_moe_reference(x, w13, w2, weights, other_rank), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_int_moe_fixed_shape_traces_one_token_whole(fmt: str) -> None:
    """A captured batch-1 decode graph picks its experts' codes by data-dependent index: traced as one graph (no
    graph break at the expert choice, which used to split every MoE layer's step into eager pieces)."""
    num_experts, hidden, inter, top_k = 6, 128, 128, 2
    gen = torch.Generator().manual_seed(7)
    quantize = {"int8": quantize_int8, "int4": quantize_int4}[fmt]
    packed13 = stack_packed([pack(quantize(torch.randn(2 * inter, hidden, generator=gen) * 0.1), torch.float32)
                             for _ in range(num_experts)])
    packed2 = stack_packed([pack(quantize(torch.randn(hidden, inter, generator=gen) * 0.1), torch.float32)
                            for _ in range(num_experts)])
    x, weights = torch.randn(1, hidden, generator=gen), torch.rand(1, top_k, generator=gen)
    step = torch.compile(reference.fused_moe_int_fixed_shape, backend="eager", fullgraph=True)
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        for ids in ([[4, 1]], [[0, 5]], [[2, num_experts + 3]]):  # one graph serves every routing
            ids = torch.tensor(ids)
            torch.testing.assert_close(step(x, packed13, packed2, weights, ids),
                                       reference.fused_moe_int_fixed_shape(x, packed13, packed2, weights, ids))
