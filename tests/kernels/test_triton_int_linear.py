"""Triton W8A16 / W4A16 GEMMs against the plain dequantise-then-matmul reference (``quant.reference_linear``):
per-channel INT8 (and W8A8 activations), INT4 symmetric, with zero points and with act order, partial tiles and
leading batch dims, on weights packed in the ``triton`` layout."""

from __future__ import annotations

import pytest
import torch

from dsv32.kernels.quant import TRITON_LAYOUT, pack, pack_int4_rows, quantize_int4, quantize_int8, reference_linear

from .conftest import needs_triton
from .helpers import INT_FORMATS


def test_int4_row_packing_keeps_every_code() -> None:
    codes = quantize_int4(torch.randn(16, 256), 128)
    packed = pack_int4_rows(codes.q)
    assert packed.shape == (16, 128) and packed.dtype == torch.uint8
    assert torch.equal(packed & 15, codes.q[:, 0::2]) and torch.equal(packed >> 4, codes.q[:, 1::2])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("fmt", "lead", "n_out", "k_in"), [
    ("int8", (3,), 200, 192),          # partial n and k tiles
    ("int8", (2, 5), 64, 256),
    ("w8a8", (4,), 72, 128),
    ("int4", (33,), 96, 256),          # several m tiles, two groups
    ("int4_zero", (1,), 80, 384),      # zero points, partial n tile
    ("int4_act_order", (5,), 40, 192),
])
def test_int_linear_matches_reference(fmt: str, lead: tuple[int, ...], n_out: int, k_in: int, dtype: torch.dtype,
                                      device: torch.device) -> None:
    from dsv32.kernels.triton_int_linear import int_linear

    gen = torch.Generator().manual_seed(2)
    w = torch.randn(n_out, k_in, generator=gen) * torch.rand(n_out, 1, generator=gen) * 4
    weight = INT_FORMATS[fmt](w)
    x = torch.randn(*lead, k_in, generator=gen).to(dtype)
    want = reference_linear(x, weight)
    packed = pack(weight.to(device), dtype, TRITON_LAYOUT)
    assert packed.layout == TRITON_LAYOUT and (packed.perm is not None) == (fmt == "int4_act_order")
    got = int_linear(x.to(device), packed).cpu()
    assert got.shape == (*lead, n_out) and got.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol * want.abs().max().item(), rtol=tol)
    assert not torch.allclose(got.float(), x.float() @ w.t(), atol=1e-6)  # the codes, not the original weight


@needs_triton
def test_triton_gemm_refuses_a_cpu_packed_weight() -> None:
    from dsv32.kernels.triton_int_linear import int_linear

    with pytest.raises(ValueError, match="'triton' layout"):
        int_linear(torch.randn(2, 128), pack(quantize_int8(torch.randn(16, 128)), torch.float32))


def test_triton_layout_takes_groups_of_sixteen_and_any_row_count() -> None:
    weight = quantize_int4(torch.randn(24, 96), 32)  # N not a multiple of 16: too narrow for the CPU tiles
    with pytest.raises(ValueError, match="N % 16"):
        pack(weight, torch.float32)
    packed = pack(weight, torch.float32, TRITON_LAYOUT)
    assert packed.data.shape == (24, 48) and packed.scales.shape == (24, 3) and packed.zeros is None
    with pytest.raises(ValueError, match="multiple of 16"):
        pack(quantize_int4(torch.randn(16, 96), 24), torch.float32, TRITON_LAYOUT)
    with pytest.raises(ValueError, match="expected one of cpu, triton"):
        pack(weight, torch.float32, "cuda")


def test_layout_follows_the_device_and_its_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    from dsv32 import kernels

    monkeypatch.setattr(kernels, "_backend_for", lambda device_type: kernels.TORCH_BACKEND)
    assert kernels.int_weight_layout("cpu") == "cpu"
    assert kernels.int_weight_layout("meta") is None
    with pytest.raises(RuntimeError, match="cannot run on meta"):
        kernels.require_int_layout("meta")
    monkeypatch.setattr(kernels, "triton_runs_on", lambda device_type: False)
    assert kernels.int_weight_layout("cuda") is None  # CUDA without triton: no integer kernel


@needs_triton
def test_layout_is_triton_on_cuda_and_under_the_triton_backend() -> None:
    from dsv32 import kernels

    assert kernels.int_weight_layout("cuda") == TRITON_LAYOUT
    with kernels.using_backend(kernels.triton_backend()):
        assert kernels.int_weight_layout("cpu") == TRITON_LAYOUT
    assert kernels.int_ops(TRITON_LAYOUT).name == TRITON_LAYOUT


@needs_triton
@pytest.mark.parametrize("fmt", ["int8", "w8a8", "int4_zero", "int4_act_order"])
def test_model_linear_runs_the_triton_gemm_on_triton_packed_codes(fmt: str, device: torch.device) -> None:
    """``Linear.quantize`` where the Triton kernels run packs in their layout; ``forward`` and
    ``dequantized_weight`` then go through the Triton GEMM, whatever backend the call itself is under."""
    from dsv32 import kernels
    from dsv32.kernels import triton_int_linear
    from dsv32.kernels.quant import dequantize
    from dsv32.model.linear import Linear

    gen = torch.Generator().manual_seed(5)
    weight = INT_FORMATS[fmt](torch.randn(48, 256, generator=gen))
    linear = Linear(256, 48, torch.float32).to(device)
    with kernels.using_backend(kernels.triton_backend()):
        linear.quantize(weight)
    assert linear.int_weight.layout == TRITON_LAYOUT and linear.int_weight.data.device.type == device.type
    calls = []
    gemm = triton_int_linear.int_linear

    def counting(*args, **kwargs):
        calls.append(1)
        return gemm(*args, **kwargs)

    x = torch.randn(3, 256, generator=gen)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels.int_ops(TRITON_LAYOUT), "int_linear", counting)
        got = linear(x.to(device)).cpu()
        if not weight.act_quant:  # W8A8 rounds the identity's rows too: its product is not W
            torch.testing.assert_close(linear.dequantized_weight().cpu(), dequantize(weight), atol=1e-5, rtol=1e-5)
    assert calls
    want = reference_linear(x, weight)
    torch.testing.assert_close(got, want, atol=1e-4 * want.abs().max().item(), rtol=1e-4)
