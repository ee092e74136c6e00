"""Triton block-scaled FP8 GEMM against the torch reference (blockwise dequantise, then matmul), incl. partial edge
blocks in both dims, non-128 blocks and leading batch dims."""

from __future__ import annotations

import pytest
import torch

from dsv32.kernels import reference
from dsv32.kernels.fp8 import FP8_DTYPE, dequantize_block_fp8, quantize_block_fp8

from .conftest import needs_triton


def test_reference_is_dequantise_then_matmul() -> None:
    gen = torch.Generator().manual_seed(0)
    q, s = quantize_block_fp8(torch.randn(200, 192, generator=gen))
    x = torch.randn(3, 192, generator=gen)
    dense = dequantize_block_fp8(q, s, (128, 128), torch.float32)
    assert torch.equal(reference.fp8_linear(x, q, s, (128, 128)), reference.matmul_wt(x, dense))
    assert torch.allclose(reference.fp8_linear(x, q, s, (128, 128)), x @ dense.t(), atol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("lead", "n_out", "k_in", "block", "tiles"), [
    ((3,), 200, 192, (128, 128), {}),                      # partial last row and column blocks
    ((2, 5), 64, 320, (128, 128), {"block_k": 128}),        # one partial row block, 2.5 column blocks
    ((33,), 256, 256, (128, 128), {"block_m": 16, "block_n": 32, "block_k": 32}),  # several m tiles, tiles < block
    ((4,), 96, 80, (64, 48), {}),                          # non-128 blocks: block_k cut to 16
])
def test_fp8_linear_matches_reference(dtype: torch.dtype, lead: tuple[int, ...], n_out: int, k_in: int,
                                      block: tuple[int, int], tiles: dict, device: torch.device) -> None:
    from dsv32.kernels import triton_fp8_linear

    gen = torch.Generator().manual_seed(1)
    # distinct magnitudes per block so a wrong block index shows
    w = torch.randn(n_out, k_in, generator=gen) * torch.rand(n_out, 1, generator=gen) * 4
    q, s = quantize_block_fp8(w, block)
    assert q.dtype == FP8_DTYPE and s.dtype == torch.float32
    x = torch.randn(*lead, k_in, generator=gen).to(dtype)
    want = reference.fp8_linear(x.to(device), q.to(device), s.to(device), block)
    got = triton_fp8_linear.fp8_linear(x.to(device), q.to(device), s.to(device), block, **tiles)
    assert got.shape == (*lead, n_out) and got.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float().cpu(), want.float().cpu(), atol=tol * want.abs().max().item(), rtol=tol)


@needs_triton
def test_fp8_linear_empty_input_and_bad_scale_shape(device: torch.device) -> None:
    from dsv32.kernels import triton_fp8_linear

    q, s = quantize_block_fp8(torch.randn(64, 128))
    q, s = q.to(device), s.to(device)
    assert triton_fp8_linear.fp8_linear(torch.empty(0, 128, device=device), q, s, (128, 128)).shape == (0, 64)
    with pytest.raises(ValueError, match=r"scale_inv has shape \(1, 2\), expected \(1, 1\)"):
        triton_fp8_linear.fp8_linear(torch.randn(2, 128, device=device), q, s.repeat(1, 2), (128, 128))
