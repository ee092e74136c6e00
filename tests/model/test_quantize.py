"""Online INT8 / INT4 quantisation at load: the packed model against a dequantise-then-matmul reference model, the
covered projections, bytes, and the --quantization checks."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from dsv32.config import ConfigError, ModelConfig
from dsv32.kernels.quant import dequantize, packable
from dsv32.model.linear import Linear
from dsv32.model.loader import load_model
from dsv32.model.moe import Experts
from dsv32.model.quantize import QUANTIZED_PROJECTIONS, quantizer, weight_bytes

from .conftest import VOCAB, make_hf_checkpoint, single_sequence_batch
from .test_loader import _write_fp8_checkpoint


@pytest.fixture(scope="module")
def wide_expert_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A V3.2 checkpoint whose experts' intermediate size (128) is a whole INT4 group, so INT4 covers them too."""
    return make_hf_checkpoint(str(tmp_path_factory.mktemp("wide") / "v32"), "v32", moe_intermediate_size=128)


def _reference_model(config: ModelConfig, path: str, method: str) -> torch.nn.Module:
    """The unquantised model with every covered weight replaced by its dequantised codes, multiplied densely."""
    bits, quantize = quantizer(method)
    model = load_model(config, path, dtype="float32", progress=False)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, Linear) and name.rpartition(".")[2] in QUANTIZED_PROJECTIONS:
                if packable(tuple(module.weight.shape), bits):
                    module.weight.copy_(dequantize(quantize(module.weight)))
            elif isinstance(module, Experts) and all(packable(tuple(s.shape[1:]), bits)
                                                     for s in (module.gate_up_proj, module.down_proj)):
                for stack in (module.gate_up_proj, module.down_proj):
                    for w in stack:
                        w.copy_(dequantize(quantize(w)))
    model.prepare_weights()
    return model


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    cache = model.allocate_kv_cache(4, 16, "auto")
    return model.compute_logits(model(single_sequence_batch(ids, 0, [0, 1, 2, 3], 16), cache))


@pytest.mark.parametrize("arch", ["v3", "v32", "v32-wide-experts"])
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_logits_equal_dequantized_reference(hf_checkpoints: dict[str, str], wide_expert_checkpoint: str,
                                                      arch: str, method: str) -> None:
    path = wide_expert_checkpoint if arch == "v32-wide-experts" else hf_checkpoints[arch]
    config = ModelConfig.from_pretrained(path)
    ids = torch.randint(0, VOCAB, (24,), generator=torch.Generator().manual_seed(1))
    quantized = load_model(config, path, dtype="float32", progress=False, quantization=method)
    plain = load_model(config, path, dtype="float32", progress=False)
    if arch == "v32-wide-experts":
        assert all(layer.mlp.experts.gate_up_int.bits == int(method[3:]) for layer in quantized.model.layers[1:])
    got, want = _logits(quantized, ids), _logits(_reference_model(config, path, method), ids)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-3)
    # ... and the codes changed the model (the reference is not just the unquantised one)
    assert (got - _logits(plain, ids)).abs().max() > 1e-3
    assert weight_bytes(quantized) < weight_bytes(plain)


def test_int8_logits_close_to_unquantized(hf_checkpoints: dict[str, str]) -> None:
    for arch in ("v3", "v32"):
        path = hf_checkpoints[arch]
        config = ModelConfig.from_pretrained(path)
        ids = torch.randint(0, VOCAB, (24,), generator=torch.Generator().manual_seed(2))
        full = _logits(load_model(config, path, dtype="float32", progress=False), ids)
        int8 = _logits(load_model(config, path, dtype="float32", progress=False, quantization="int8"), ids)
        p, q = full.log_softmax(-1), int8.log_softmax(-1)
        kl = (p.exp() * (p - q)).sum(-1)
        assert kl.max() < 1e-3, arch
        assert (full.argmax(-1) == int8.argmax(-1)).float().mean() >= 0.9, arch


def test_covered_projections_and_kept_ones(hf_checkpoints: dict[str, str]) -> None:
    path = hf_checkpoints["v32"]
    model = load_model(ModelConfig.from_pretrained(path), path, dtype="float32", progress=False, quantization="int8")
    layer = model.model.layers[1]
    attn = layer.self_attn
    for linear in (attn.q_a_proj, attn.q_b_proj, attn.kv_a_proj_with_mqa, attn.o_proj, attn.indexer.wq_b,
                   attn.indexer.wk, layer.mlp.shared_experts.gate_proj, model.model.layers[0].mlp.down_proj):
        assert linear.int_weight is not None and linear.int_weight.bits == 8 and linear.weight.numel() == 0
    assert layer.mlp.experts.gate_up_int is not None and layer.mlp.experts.down_int is not None
    for kept in (attn.kv_b_proj, attn.indexer.weights_proj, model.lm_head):
        assert kept.int_weight is None and kept.weight.numel() > 0
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert layer.mlp.gate.weight.dtype == torch.float32


def test_quantization_flag_checks(hf_checkpoints: dict[str, str]) -> None:
    path = hf_checkpoints["v3"]
    config = ModelConfig.from_pretrained(path)
    with pytest.raises(ConfigError, match="quant_method' is None"):
        load_model(config, path, dtype="float32", progress=False, quantization="w8a8_int8")
    with pytest.raises(ConfigError, match="run on CPU, or on CUDA with the triton package"):
        load_model(config, None, device="meta", progress=False, quantization="int8")


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_online_quantization_of_an_fp8_checkpoint_quantizes_its_dequantized_weights(
        hf_checkpoints: dict[str, str], tmp_path, method: str) -> None:
    """From FP8: the e4m3 weights are dequantised at load, then quantised, exactly as the same weights stored in
    bf16/fp32 would be."""
    fp8_dir, plain_dir = str(tmp_path / "fp8"), str(tmp_path / "plain")
    reference = _write_fp8_checkpoint(hf_checkpoints["v32"], fp8_dir)
    os.makedirs(plain_dir)
    save_file({k: v.contiguous() for k, v in reference.items()}, os.path.join(plain_dir, "model.safetensors"))
    shutil.copy(os.path.join(hf_checkpoints["v32"], "config.json"), plain_dir)
    ids = torch.randint(0, VOCAB, (16,), generator=torch.Generator().manual_seed(3))
    from_fp8 = load_model(ModelConfig.from_pretrained(fp8_dir), fp8_dir, dtype="float32", progress=False,
                          quantization=method)
    from_plain = load_model(ModelConfig.from_pretrained(plain_dir), plain_dir, dtype="float32", progress=False,
                            quantization=method)
    assert from_fp8.model.layers[1].self_attn.o_proj.int_weight is not None
    torch.testing.assert_close(_logits(from_fp8, ids), _logits(from_plain, ids), atol=1e-5, rtol=1e-5)


def test_dequantized_weight_of_an_int_linear_is_its_codes() -> None:
    linear = Linear(2304, 48, torch.float32)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 2304))
    codes = quantizer("int8")[1](linear.weight)
    linear.quantize(codes)
    torch.testing.assert_close(linear.dequantized_weight(), dequantize(codes), atol=1e-6, rtol=1e-5)
