"""Backend selection, and the whole (tiny) model through the Triton backend against the torch backend."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import dsv32.kernels as kernels
from dsv32.config import tiny_config
from dsv32.model.loader import load_model
from tests.model.conftest import multi_sequence_batch

from .conftest import HAS_TRITON, needs_triton


def test_auto_picks_torch_off_cuda_and_honours_the_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)
    assert kernels.select_backend("cpu").name == "torch"
    assert kernels.select_backend("cpu", "torch") is kernels.TORCH_BACKEND
    monkeypatch.setenv(kernels.BACKEND_ENV, "TORCH")
    assert kernels.select_backend("cuda").name == "torch"
    with pytest.raises(ValueError, match="expected one of auto, torch, triton"):
        kernels.select_backend("cuda", "cutlass")


@needs_triton
def test_triton_on_cuda_by_default_and_on_cpu_only_when_interpreting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert kernels.select_backend("cuda", "auto").name == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.select_backend("cpu", "triton").name == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.select_backend("cpu", "triton")


@pytest.mark.skipif(HAS_TRITON, reason="checks the behaviour without triton")
def test_without_triton_auto_falls_back_and_forcing_fails() -> None:
    assert kernels.select_backend("cuda", "auto").name == "torch"
    with pytest.raises(RuntimeError):
        kernels.select_backend("cuda", "triton")


def test_backends_expose_the_same_ops() -> None:
    ops = [f.name for f in dataclasses.fields(kernels.KernelBackend) if f.name != "name"]
    assert ops == ["indexer_topk", "mla_decode", "mla_prefill", "fused_moe", "rms_norm"]
    assert all(callable(getattr(kernels.TORCH_BACKEND, op)) for op in ops)


@needs_triton
@pytest.mark.parametrize("fmt", ["auto", "fp8"])
def test_tiny_model_same_outputs_on_both_backends(fmt: str, device: torch.device,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefill chunks + decodes of two sequences, with the indexer pruning (top-8 of up to 15 keys) and the MoE."""
    config = dataclasses.replace(tiny_config(), num_hidden_layers=2, index_topk=8)
    model = load_model(config, None, load_format="dummy", dtype="float32", device=device, progress=False)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 1000, (15,), generator=gen), torch.randint(0, 1000, (12,), generator=gen)
    steps = [[(a[:11], 0, [0]), (b[:5], 0, [2])],          # two prefills (a: longer than top-k)
             [(a[11:12], 11, [0]), (b[5:12], 5, [2])],     # a decodes over a pruned context, b prefills a chunk
             [(a[12:13], 12, [0]), (b[11:12], 11, [2])]]   # two decodes

    def run(backend: kernels.KernelBackend) -> list[torch.Tensor]:
        monkeypatch.setattr(kernels, "_backend_for", lambda device_type: backend)
        cache = model.allocate_kv_cache(4, 16, fmt)
        outs = []
        for step in steps:
            batch = multi_sequence_batch(step, 16)
            batch = dataclasses.replace(batch, input_ids=batch.input_ids.to(device),
                                        positions=batch.positions.to(device),
                                        block_tables=batch.block_tables.to(device),
                                        slot_mapping=batch.slot_mapping.to(device))
            outs.append(model(batch, cache).cpu())
        return outs

    expected = run(kernels.TORCH_BACKEND)
    got = run(kernels.triton_backend())
    for e, g in zip(expected, got, strict=True):
        assert (g - e).abs().max() <= 1e-4 * e.abs().max()
