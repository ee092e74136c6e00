"""Triton W8A16 / W4A16 GEMMs against the plain dequantise-then-matmul reference (``quant.reference_linear``):
per-channel INT8, INT4 symmetric and with zero points, partial tiles and leading batch dims."""

from __future__ import annotations

import pytest
import torch

from dsv32.kernels.quant import quantize_int4, quantize_int8, reference_linear

from .conftest import needs_triton


def test_int4_row_packing_keeps_every_code() -> None:
    from dsv32.kernels.triton_int_linear import pack_int4_rows

    codes = quantize_int4(torch.randn(16, 256), 128)
    packed = pack_int4_rows(codes)
    assert packed.shape == (16, 128) and packed.dtype == torch.uint8
    assert torch.equal(packed & 15, codes.q[:, 0::2]) and torch.equal(packed >> 4, codes.q[:, 1::2])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("fmt", "lead", "n_out", "k_in"), [
    ("int8", (3,), 200, 192),          # partial n and k tiles
    ("int8", (2, 5), 64, 256),
    ("int4", (33,), 96, 256),          # several m tiles, two groups
    ("int4_zero", (1,), 80, 384),      # zero points, partial n tile
])
def test_int_linear_matches_reference(fmt: str, lead: tuple[int, ...], n_out: int, k_in: int, dtype: torch.dtype,
                                      device: torch.device) -> None:
    from dsv32.kernels.triton_int_linear import int_linear, pack_int4_rows

    gen = torch.Generator().manual_seed(2)
    w = torch.randn(n_out, k_in, generator=gen) * torch.rand(n_out, 1, generator=gen) * 4
    weight = {"int8": lambda: quantize_int8(w), "int4": lambda: quantize_int4(w, 128),
              "int4_zero": lambda: quantize_int4(w, 128, symmetric=False)}[fmt]()
    x = torch.randn(*lead, k_in, generator=gen).to(dtype)
    want = reference_linear(x, weight)
    on_device = type(weight)(**{**weight.__dict__, "q": weight.q.to(device), "scale": weight.scale.to(device),
                                "zero": weight.zero.to(device) if weight.zero is not None else None})
    packed = pack_int4_rows(on_device) if weight.bits == 4 else None
    got = int_linear(x.to(device), on_device, packed).cpu()
    assert got.shape == (*lead, n_out) and got.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol * want.abs().max().item(), rtol=tol)
    assert not torch.allclose(got.float(), x.float() @ w.t(), atol=1e-6)  # the codes, not the original weight
