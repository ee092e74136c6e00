"""Prepacked CPU linear weights: the same bits as ``F.linear`` on the plain weight, and ``Linear`` uses them once
prepared (and drops them when its weight becomes FP8)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsv32.kernels import reference
from dsv32.model.linear import Linear

needs_bf16_onednn = pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    reason="this CPU's oneDNN has no bf16 kernels")


@needs_bf16_onednn
@pytest.mark.parametrize(("n_out", "k_in"), [(64, 256), (384, 64), (8, 512), (1000, 96)])
@pytest.mark.parametrize("rows", [(1,), (8,), (129,), (2, 5)])
def test_packed_linear_is_bit_identical_to_f_linear(n_out: int, k_in: int, rows: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(n_out, k_in, generator=gen) * 0.05).to(torch.bfloat16)
    x = torch.randn(*rows, k_in, generator=gen).to(torch.bfloat16)
    packed = reference.prepack_weight(weight)
    assert packed is not None
    assert torch.equal(reference.packed_linear(x, packed), F.linear(x, weight))


def test_only_bf16_cpu_weights_are_packed() -> None:
    assert reference.prepack_weight(torch.randn(16, 32)) is None  # fp32: MKL's sgemm
    assert reference.prepack_weight(torch.randn(2, 16, 32).to(torch.bfloat16)) is None


@needs_bf16_onednn
def test_linear_uses_the_packed_weight_until_it_becomes_fp8() -> None:
    gen = torch.Generator().manual_seed(1)
    layer = Linear(96, 200, torch.bfloat16)
    layer.weight.data.copy_(torch.randn(200, 96, generator=gen) * 0.05)
    x = torch.randn(3, 96, generator=gen).to(torch.bfloat16)
    plain = layer(x)
    layer.prepare_weights()
    assert layer.packed_weight is not None
    assert torch.equal(layer(x), plain)
    layer.to_fp8((128, 128))
    assert layer.packed_weight is None
