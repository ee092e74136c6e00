"""Triton fused add + RMSNorm against the reference and the model's own ``RMSNorm`` module."""

from __future__ import annotations

import pytest
import torch

from dsv32.kernels import reference
from dsv32.model.norm import RMSNorm

from .conftest import needs_triton


def test_reference_matches_model_rmsnorm_module() -> None:
    gen = torch.Generator().manual_seed(0)
    norm = RMSNorm(96)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(96, generator=gen) + 0.5)
    x = torch.randn(5, 96, generator=gen).to(torch.bfloat16)
    r = torch.randn(5, 96, generator=gen).to(torch.bfloat16)
    y, h = reference.rms_norm(x, norm.weight, norm.eps, r)
    assert torch.equal(h, x + r)
    hf = h.float()  # the definition, written out: normalised in fp32, rounded before and after the weight
    expected = ((hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + norm.eps)).to(h.dtype) * norm.weight).to(h.dtype)
    assert torch.equal(y, expected)
    assert torch.equal(norm(x + r), expected)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_add_rms_norm_matches_reference(dtype: torch.dtype, with_residual: bool, device: torch.device) -> None:
    from dsv32.kernels import triton_norm

    gen = torch.Generator().manual_seed(1)
    hidden = 7168  # the real width: one program per row, BLOCK 8192 with a masked tail
    x = (torch.randn(3, hidden, generator=gen) * 3).to(dtype)
    r = torch.randn(3, hidden, generator=gen).to(dtype) if with_residual else None
    w = torch.rand(hidden, generator=gen) + 0.5
    y_ref, h_ref = reference.rms_norm(x, w, 1e-6, r)
    y, h = triton_norm.rms_norm(x.to(device), w.to(device), 1e-6, r.to(device) if r is not None else None)
    assert torch.equal(h.cpu(), h_ref)
    ulp = 1e-2 if dtype == torch.bfloat16 else 1e-6  # one rounding step apart at most (fp32 sum order)
    assert torch.allclose(y.cpu().float(), y_ref.float(), rtol=ulp, atol=ulp)


@pytest.mark.parametrize("exact", [True, False])
def test_a_weight_kept_in_the_compute_dtype_normalises_the_same(exact: bool) -> None:
    gen = torch.Generator().manual_seed(2)
    norm = RMSNorm(64)
    with torch.no_grad():
        norm.weight.copy_((torch.rand(64, generator=gen) + 0.5).to(torch.bfloat16) if exact
                          else torch.full((64,), 1.0 + 2**-12))  # 1 + 2^-12 is not a bf16 value
    x = torch.randn(4, 64, generator=gen).to(torch.bfloat16)
    before = norm(x)
    norm.prepare_weights(torch.bfloat16)
    assert (norm.compute_weight is not None) == exact
    assert torch.equal(norm(x), before)
