"""Backend selection, and the whole (tiny) model through the Triton backend against the torch backend; with INT8 /
INT4 weights (online, or a W4A16 checkpoint's codes), through the Triton integer kernels against the CPU ones."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import os

import pytest
import torch

import dsv32.kernels as kernels
from dsv32.config import tiny_config
from dsv32.kernels.fp8 import quantize_block_fp8
from dsv32.model.batch import ForwardBatch
from dsv32.model.linear import Linear
from dsv32.model.loader import load_model
from dsv32.model.moe import Experts
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


INTERFACES = [(kernels.KernelBackend, kernels.KERNEL_OPS, lambda: kernels.TORCH_BACKEND, kernels.triton_backend),
              (kernels.IntKernels, kernels.INT_OPS, lambda: kernels.int_ops("cpu"), lambda: kernels.int_ops("triton"))]


@pytest.mark.parametrize(("interface", "names", "torch_ops", "triton_ops"), INTERFACES)
def test_backends_expose_the_same_ops(interface: type, names: tuple[str, ...], torch_ops, triton_ops) -> None:
    ops = [name for name in vars(interface) if not name.startswith("_")]
    assert ops == list(names)
    for op in ops:  # the torch backend's ops take the interface's parameters (the Protocol's lead with self)
        expected = list(inspect.signature(getattr(interface, op)).parameters)[1:]
        assert list(inspect.signature(getattr(torch_ops(), op)).parameters) == expected


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package")
@pytest.mark.parametrize(("interface", "names", "torch_ops", "triton_ops"), INTERFACES)
def test_triton_ops_take_the_interface_parameters_first(interface: type, names: tuple[str, ...], torch_ops,
                                                        triton_ops) -> None:
    """Each Triton op takes the interface's parameters, then only tuning knobs with defaults (tile sizes)."""
    backend = triton_ops()
    for op in names:
        expected = list(inspect.signature(getattr(interface, op)).parameters)[1:]
        params = list(inspect.signature(getattr(backend, op)).parameters.values())
        assert [p.name for p in params[:len(expected)]] == expected, op
        assert all(p.default is not inspect.Parameter.empty for p in params[len(expected):]), op


def _keep_weights_in_fp8(model: torch.nn.Module) -> None:
    """What ``load_model(keep_fp8=True)`` makes of an FP8 checkpoint: every projection (but the fp32 indexer head
    weights and the LM head) and the routed experts in e4m3 with 128x128 block scales."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, Linear) and not name.endswith(("weights_proj", "lm_head")):
                q, s = quantize_block_fp8(module.weight)
                module.to_fp8((128, 128))
                module.weight.copy_(q)
                module.weight_scale_inv.copy_(s)
            elif isinstance(module, Experts):
                for part in ("gate_up_proj", "down_proj"):
                    pairs = [quantize_block_fp8(w) for w in getattr(module, part)]
                    module.to_fp8(part)
                    getattr(module, part).copy_(torch.stack([q for q, _ in pairs]))
                    getattr(module, f"{part}_scale_inv").copy_(torch.stack([s for _, s in pairs]))
    model.prepare_weights()


def _on(batch: ForwardBatch, device: torch.device) -> ForwardBatch:
    """``batch`` with its tensors on ``device``."""
    return dataclasses.replace(batch, input_ids=batch.input_ids.to(device), positions=batch.positions.to(device),
                               block_tables=batch.block_tables.to(device), slot_mapping=batch.slot_mapping.to(device))


@needs_triton
@pytest.mark.parametrize(("fmt", "fp8_weights"), [("auto", False), ("fp8", False), ("auto", True)])
def test_tiny_model_same_outputs_on_both_backends(fmt: str, fp8_weights: bool, device: torch.device,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefill chunks + decodes of two sequences, with the indexer pruning (top-8 of up to 15 keys) and the MoE;
    the weights in the compute dtype or kept in e4m3 (``fp8_linear``, FP8 ``fused_moe``, dequantised ``kv_b_proj``)."""
    config = dataclasses.replace(tiny_config(), num_hidden_layers=2, index_topk=8)
    model = load_model(config, None, load_format="dummy", dtype="float32", device=device, progress=False)
    if fp8_weights:
        _keep_weights_in_fp8(model)
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
            outs.append(model(_on(multi_sequence_batch(step, 16), device), cache).cpu())
        return outs

    expected = run(kernels.TORCH_BACKEND)
    got = run(kernels.triton_backend())
    for e, g in zip(expected, got, strict=True):
        assert (g - e).abs().max() <= 1e-4 * e.abs().max()


def test_the_engine_model_runs_on_its_own_backend_and_leaves_the_process_default(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``EngineConfig.kernel_backend`` is the model's: its calls run on it, in their thread only; nothing else in the
    process (the environment, a layer called on its own) changes."""
    from dsv32.config import EngineConfig
    from dsv32.engine.executor.loading import load_engine_model

    monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)
    config = dataclasses.replace(tiny_config(), num_hidden_layers=1)
    model = load_engine_model(EngineConfig(kernel_backend="torch", dtype="float32"), config, torch.device("cpu"))
    assert model.kernel_backend is kernels.TORCH_BACKEND
    calls: list[str] = []

    class Counting(kernels.ModuleBackend):
        def __getattribute__(self, name: str) -> object:
            if name in kernels.KERNEL_OPS:
                calls.append(name)
            return super().__getattribute__(name)

    model.kernel_backend = Counting("counting", kernels.reference)
    batch = multi_sequence_batch([(torch.tensor([5, 6, 7]), 0, [0])], 16)
    model(batch, model.allocate_kv_cache(2, 16, "auto"))
    assert "rms_norm" in calls and "mla_prefill" in calls
    assert kernels.get_backend("cpu") is kernels.TORCH_BACKEND  # outside the model's calls: the process default
    assert kernels.BACKEND_ENV not in os.environ


@needs_triton
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_tiny_model_with_online_int_weights_on_the_triton_kernels(method: str, device: torch.device,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``--quantization int8|int4`` loaded where the Triton kernels run (the Triton backend in effect at load):
    every covered projection and the experts in the ``triton`` layout, and the logits those kernels give equal the
    CPU packed kernels' for the same codes (the other ops on the torch backend in both, so only the integer
    kernels differ)."""
    from dsv32.kernels.quant import CPU_LAYOUT, TRITON_LAYOUT

    config = dataclasses.replace(tiny_config(), num_hidden_layers=2)

    def load(backend: kernels.KernelBackend, on: torch.device) -> torch.nn.Module:
        monkeypatch.setattr(kernels, "_backend_for", lambda device_type: backend)
        model = load_model(config, None, load_format="dummy", dtype="float32", device=on, progress=False,
                           quantization=method)
        model.kernel_backend = kernels.TORCH_BACKEND
        return model

    packed_cpu, packed_triton = load(kernels.TORCH_BACKEND, torch.device("cpu")), load(kernels.triton_backend(), device)
    layouts = {m.int_weight.layout for m in packed_triton.modules()
               if isinstance(m, Linear) and m.int_weight is not None}
    assert layouts == {TRITON_LAYOUT} and packed_triton.model.layers[1].mlp.experts.gate_up_int.layout == TRITON_LAYOUT
    assert packed_cpu.model.layers[1].mlp.experts.gate_up_int.layout == CPU_LAYOUT
    ids = torch.randint(0, 1000, (9,), generator=torch.Generator().manual_seed(4))

    def logits(model: torch.nn.Module, on: torch.device) -> torch.Tensor:
        batch = _on(multi_sequence_batch([(ids, 0, [0])], 16), on)
        return model.compute_logits(model(batch, model.allocate_kv_cache(2, 16, "auto"))).cpu()

    want, got = logits(packed_cpu, torch.device("cpu")), logits(packed_triton, device)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


@needs_triton
def test_int4_checkpoint_codes_are_held_for_the_triton_kernels(device: torch.device, tmp_path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``compressed-tensors`` W4A16 checkpoint (zero points) loaded where the Triton kernels run keeps its codes,
    in the ``triton`` layout (not dequantised at load), and gives the logits of the same codes on the CPU kernels."""
    from dsv32.config import ModelConfig
    from dsv32.kernels.quant import TRITON_LAYOUT
    from tests.model.conftest import make_hf_checkpoint, single_sequence_batch
    from tests.model.test_quant_checkpoints import write_w4a16_checkpoint

    path, _ = write_w4a16_checkpoint(make_hf_checkpoint(str(tmp_path / "v32"), "v32"), str(tmp_path), False)
    config = ModelConfig.from_pretrained(path)
    ids = torch.randint(0, 1000, (7,), generator=torch.Generator().manual_seed(6))

    def logits(backend: kernels.KernelBackend, on: torch.device) -> tuple[torch.Tensor, torch.nn.Module]:
        monkeypatch.setattr(kernels, "_backend_for", lambda device_type: backend)
        model = load_model(config, path, dtype="float32", device=on, progress=False)
        model.kernel_backend = kernels.TORCH_BACKEND  # only the integer kernels differ
        batch = _on(single_sequence_batch(ids, 0, [0], 16), on)
        return model.compute_logits(model(batch, model.allocate_kv_cache(2, 16, "auto"))).cpu(), model

    want, _ = logits(kernels.TORCH_BACKEND, torch.device("cpu"))
    got, model = logits(kernels.triton_backend(), device)
    layer = model.model.layers[1]
    assert layer.self_attn.o_proj.int_weight.layout == TRITON_LAYOUT and layer.self_attn.o_proj.weight.numel() == 0
    assert layer.mlp.experts.gate_up_int.layout == TRITON_LAYOUT and layer.mlp.experts.gate_up_int.zeros is not None
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
