"""Integer checkpoints, each written small from a tiny V3 / V3.2 checkpoint and read back by dsv32: SGLang's
``blockwise_int8`` and ``w8a8_int8``, and ``compressed-tensors`` W4A16 ``pack-quantized`` (all projections, or the
experts only). dsv32's logits equal an independent reference's: a plain dequantise-then-matmul model for the INT8
formats (with per-token activation rounding for W8A8), the weights the ``compressed-tensors`` library itself
decompresses for W4A16."""

from __future__ import annotations

import json
import os

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from safetensors.torch import load_file, save_file

from dsv32.config import ConfigError, ModelConfig
from dsv32.kernels.quant import quantize_activations_int8, quantize_int4
from dsv32.model.loader import CheckpointError, load_model

from .conftest import VOCAB, single_sequence_batch

GROUP = 64  # divides every input size of the tiny checkpoints but kv_b_proj's (32)


def _is_projection(name: str) -> bool:
    return name.endswith("proj.weight") and "weights_proj" not in name and "eh_proj" not in name


def _write(src: str, dst: str, tensors: dict[str, torch.Tensor], quantization_config: dict | None) -> str:
    os.makedirs(dst, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as fh:
        config = json.load(fh)
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    with open(os.path.join(dst, "config.json"), "w") as fh:
        json.dump(config, fh)
    return dst


def _logits(path: str, ids: torch.Tensor, hook_inputs: set[str] = frozenset()) -> torch.Tensor:
    """fp32 logits of the checkpoint at ``path``; the Linear layers named in ``hook_inputs`` see their inputs rounded
    to int8 per token first (W8A8's activations)."""
    model = load_model(ModelConfig.from_pretrained(path), path, dtype="float32", progress=False)
    for name, module in model.named_modules():
        if name + ".weight" in hook_inputs:
            module.register_forward_pre_hook(lambda _, args: (lambda q, s: (q.float() * s,))(
                *quantize_activations_int8(args[0])))
    cache = model.allocate_kv_cache(4, 16, "auto")
    return model.compute_logits(model(single_sequence_batch(ids, 0, [0, 1, 2, 3], 16), cache))


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (24,), generator=torch.Generator().manual_seed(5))


# ---- blockwise_int8 ---------------------------------------------------------------------------------------------


def _block_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int8 codes, fp32 scales per 128x128 block and the dequantised weight, block by block."""
    rows, cols = w.shape
    nr, nc = -(-rows // 128), -(-cols // 128)
    q, scale, dense = torch.empty(rows, cols, dtype=torch.int8), torch.empty(nr, nc), torch.empty(rows, cols)
    for i in range(nr):
        for j in range(nc):
            block = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].float()
            scale[i, j] = block.abs().max().clamp(min=1e-12) / 127
            codes = torch.round(block / scale[i, j]).clamp(-127, 127)
            q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = codes.to(torch.int8)
            dense[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = codes * scale[i, j]
    return q, scale, dense


@pytest.mark.parametrize("arch", ["v3", "v32"])
def test_blockwise_int8_matches_dequantized_reference(hf_checkpoints: dict[str, str], tmp_path, arch: str) -> None:
    src = hf_checkpoints[arch]
    tensors = load_file(os.path.join(src, "model.safetensors"))
    quantized, reference = {}, {}
    for name, t in tensors.items():
        if _is_projection(name):
            quantized[name], quantized[name + "_scale_inv"], reference[name] = _block_int8(t * 10.0)
        else:
            quantized[name] = reference[name] = t
    config = {"quant_method": "blockwise_int8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    path = _write(src, str(tmp_path / "int8"), quantized, config)
    assert ModelConfig.from_pretrained(path).quantization.quant_method == "blockwise_int8"
    want = _logits(_write(src, str(tmp_path / "ref"), reference, None), _ids())
    torch.testing.assert_close(_logits(path, _ids()), want, atol=1e-4, rtol=1e-4)


# ---- w8a8_int8 --------------------------------------------------------------------------------------------------


def write_w8a8(src: str, dst: str) -> tuple[str, dict[str, torch.Tensor], set[str]]:
    """A ``w8a8_int8`` copy of checkpoint ``src`` at ``dst`` (the linear projections; the routed experts stay plain,
    their W8A8 path is tested in tests/kernels): its path, the dequantised reference tensors and the projections
    whose inputs the reference rounds to int8 per token."""
    tensors = load_file(os.path.join(src, "model.safetensors"))
    quantized, reference, rounded_inputs = {}, {}, set()
    for name, t in tensors.items():
        if _is_projection(name) and ".experts." not in name:
            scale = t.float().abs().amax(1, keepdim=True).clamp(min=1e-12) / 127
            q = torch.round(t.float() / scale).clamp(-127, 127).to(torch.int8)
            quantized[name], quantized[name.replace(".weight", ".weight_scale")] = q, scale
            reference[name] = q.float() * scale
            if "kv_b_proj" not in name:  # MLA absorbs kv_b_proj at load: dequantised, weight-only
                rounded_inputs.add(name)
        else:
            quantized[name] = reference[name] = t
    return _write(src, dst, quantized, {"quant_method": "w8a8_int8"}), reference, rounded_inputs


@pytest.mark.parametrize("arch", ["v3", "v32"])
def test_w8a8_int8_matches_reference_with_token_activation_rounding(hf_checkpoints: dict[str, str], tmp_path,
                                                                     arch: str) -> None:
    src = hf_checkpoints[arch]
    path, reference, rounded_inputs = write_w8a8(src, str(tmp_path / "w8a8"))
    model = load_model(ModelConfig.from_pretrained(path), path, dtype="float32", progress=False)
    assert model.model.layers[0].self_attn.o_proj.int_weight.act_quant
    want = _logits(_write(src, str(tmp_path / "ref"), reference, None), _ids(), rounded_inputs)
    torch.testing.assert_close(_logits(path, _ids()), want, atol=1e-4, rtol=1e-4)


# ---- compressed-tensors W4A16 -----------------------------------------------------------------------------------


def _scheme(symmetric: bool) -> QuantizationScheme:
    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=GROUP))


def _compress(w: torch.Tensor, symmetric: bool) -> dict[str, torch.Tensor]:
    """``pack-quantized`` tensors of ``w``: signed codes packed by the library, bf16 scales (as GPTQ exports)."""
    codes = quantize_int4(w, GROUP, symmetric)
    scale = codes.scale.to(torch.bfloat16)
    signed = (codes.q.to(torch.int16) - 8).to(torch.int8)
    out = {"weight_packed": pack_to_int32(signed, 4), "weight_scale": scale, "weight_shape": torch.tensor(w.shape)}
    if not symmetric:
        out["weight_zero_point"] = pack_to_int32((codes.zero - 8).to(torch.int8), 4, packed_dim=0)
    return out


def write_w4a16_checkpoint(src: str, dst: str, symmetric: bool, experts_only: bool = False) -> tuple[str, str]:
    """``(the checkpoint at src as compressed-tensors W4A16 in dst, the same model with the weights the library
    decompresses, in dst/ref)``: every projection but ``kv_b_proj`` (or the routed experts only) quantised."""
    tensors = load_file(os.path.join(src, "model.safetensors"))
    quantized, reference, ignore = {}, {}, ["lm_head"]
    for name, t in tensors.items():
        module = name.removesuffix(".weight")
        wanted = ".experts." in name if experts_only else "kv_b_proj" not in name
        if _is_projection(name) and wanted:
            packed = _compress(t * 10.0, symmetric)
            quantized.update({f"{module}.{k}": v for k, v in packed.items()})
            library = PackedQuantizationCompressor.decompress(
                {**packed, "weight_scale": packed["weight_scale"].float()}, _scheme(symmetric))
            reference[name] = library["weight"]
        else:
            quantized[name] = reference[name] = t
            if _is_projection(name):
                ignore.append(module)
    config = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
              "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None,
                                            "weights": {"num_bits": 4, "type": "int", "symmetric": symmetric,
                                                        "strategy": "group", "group_size": GROUP}}},
              "ignore": ignore}
    return (_write(src, os.path.join(dst, "w4a16"), quantized, config),
            _write(src, os.path.join(dst, "ref"), reference, None))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("experts_only", [False, True])
@pytest.mark.parametrize("arch", ["v3", "v32"])
def test_compressed_tensors_w4a16_matches_library_decompression(hf_checkpoints: dict[str, str], tmp_path, arch: str,
                                                                symmetric: bool, experts_only: bool) -> None:
    path, reference = write_w4a16_checkpoint(hf_checkpoints[arch], str(tmp_path), symmetric, experts_only)
    model = load_model(ModelConfig.from_pretrained(path), path, dtype="float32", progress=False)
    assert model.model.layers[1].mlp.experts.gate_up_int.bits == 4
    assert (model.model.layers[0].self_attn.o_proj.int_weight is None) == experts_only
    torch.testing.assert_close(_logits(path, _ids()), _logits(reference, _ids()), atol=1e-4, rtol=1e-4)


# ---- errors -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("quantization_config", "key"), [
    ({"quant_method": "awq"}, "quantization_config.quant_method"),
    ({"quant_method": "blockwise_int8", "weight_block_size": [128]}, "quantization_config.weight_block_size"),
    ({"quant_method": "compressed-tensors", "format": "marlin-24",
      "config_groups": {"g": {"weights": {"num_bits": 4, "strategy": "group"}}}}, "quantization_config.format"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized",
      "config_groups": {"g": {"weights": {"num_bits": 4, "strategy": "group"}, "input_activations": {
          "num_bits": 8}}}}, "quantization_config.config_groups.g.input_activations"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized",
      "config_groups": {"g": {"weights": {"num_bits": 3, "strategy": "group"}}}},
     "quantization_config.config_groups.g.weights.num_bits"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {}},
     "quantization_config.config_groups"),
])
def test_bad_quantization_config_names_the_key(hf_checkpoints: dict[str, str], quantization_config: dict,
                                               key: str) -> None:
    with open(os.path.join(hf_checkpoints["v3"], "config.json")) as fh:
        config = json.load(fh)
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        ModelConfig.from_hf_config({**config, "quantization_config": quantization_config})


def test_missing_companion_is_a_checkpoint_error(hf_checkpoints: dict[str, str], tmp_path) -> None:
    src = hf_checkpoints["v3"]
    tensors = load_file(os.path.join(src, "model.safetensors"))
    name = "model.layers.0.self_attn.o_proj.weight"
    tensors[name] = torch.ones_like(tensors[name], dtype=torch.int8)  # no weight_scale beside it
    path = _write(src, str(tmp_path / "w8a8"), tensors, {"quant_method": "w8a8_int8"})
    with pytest.raises(CheckpointError, match="o_proj.weight_scale"):
        load_model(ModelConfig.from_pretrained(path), path, dtype="float32", progress=False)
