"""Checkpoint loading: FP8 block-quantised weights, sharded index files, and clear errors for bad checkpoints."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv32.config import ModelConfig
from dsv32.model.fp8 import FP8_DTYPE, quantize_block_fp8
from dsv32.model.loader import CheckpointError, load_model

from .conftest import VOCAB, single_sequence_batch


def _reference_dequant(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Block-by-block, written independently of the loader's vectorised version."""
    out = torch.empty(w.shape, dtype=torch.float32)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            block = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].float()
            out[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = block * scale[i, j]
    return out


def _write_fp8_checkpoint(src: str, dst: str) -> dict[str, torch.Tensor]:
    """Quantise every projection/expert matrix of ``src`` to e4m3 + 128x128 scales, written as two shards.
    Returns the dequantised reference weights."""
    os.makedirs(dst)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    out: dict[str, torch.Tensor] = {}
    reference: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        quantise = t.dim() == 2 and "proj" in name and "weights_proj" not in name and "eh_proj" not in name
        if quantise:
            # scale up so values use the e4m3 range and 128-blocks differ; partial blocks for e.g. 48 x 128
            q, s = quantize_block_fp8(t * 10.0)
            out[name], out[name + "_scale_inv"] = q, s
            reference[name] = _reference_dequant(q, s)
        else:
            out[name] = t
            reference[name] = t
    names = sorted(out)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: out[k].contiguous() for k in keys}, os.path.join(dst, file))
        weight_map.update(dict.fromkeys(keys, file))
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    with open(os.path.join(src, "config.json")) as fh:
        config = json.load(fh)
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}
    with open(os.path.join(dst, "config.json"), "w") as fh:
        json.dump(config, fh)
    return reference


def test_fp8_checkpoint_matches_dequantised_reference(hf_checkpoints: dict[str, str], tmp_path) -> None:
    fp8_dir, ref_dir = str(tmp_path / "fp8"), str(tmp_path / "ref")
    reference = _write_fp8_checkpoint(hf_checkpoints["v32"], fp8_dir)
    assert any(load_file(os.path.join(fp8_dir, f)).get(n, torch.empty(0)).dtype == FP8_DTYPE
               for f in os.listdir(fp8_dir) if f.endswith(".safetensors") for n in reference)
    os.makedirs(ref_dir)
    save_file(reference, os.path.join(ref_dir, "model.safetensors"))
    shutil.copy(os.path.join(hf_checkpoints["v32"], "config.json"), ref_dir)

    config = ModelConfig.from_pretrained(fp8_dir)
    assert config.quantization is not None and config.quantization.weight_block_size == (128, 128)
    fp8_model = load_model(config, fp8_dir, dtype="float32", progress=False)
    ref_model = load_model(ModelConfig.from_pretrained(ref_dir), ref_dir, dtype="float32", progress=False)
    # a non-multiple-of-128 weight: kv_a_proj_with_mqa is [48, 128], q_b_proj [192, 64] (2 x 1 partial blocks)
    a = fp8_model.model.layers[1].self_attn.q_b_proj.weight
    assert torch.equal(a, ref_model.model.layers[1].self_attn.q_b_proj.weight)
    for (name, p), (_, q) in zip(fp8_model.named_parameters(), ref_model.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    ids = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(0))
    outs = []
    for model in (fp8_model, ref_model):
        cache = model.allocate_kv_cache(4, 16, "auto")
        outs.append(model.compute_logits(model(single_sequence_batch(ids, 0, [0, 1, 2], 16), cache)))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


def test_missing_tensor_is_named(hf_checkpoints: dict[str, str], tmp_path) -> None:
    src = hf_checkpoints["v3"]
    tensors = load_file(os.path.join(src, "model.safetensors"))
    del tensors["model.layers.1.self_attn.o_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    shutil.copy(os.path.join(src, "config.json"), tmp_path)
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): model\.layers\.1\.self_attn\.o_proj\.weight"):
        load_model(ModelConfig.from_pretrained(str(tmp_path)), str(tmp_path), progress=False)


def test_misshapen_tensor_is_named(hf_checkpoints: dict[str, str], tmp_path) -> None:
    src = hf_checkpoints["v3"]
    tensors = load_file(os.path.join(src, "model.safetensors"))
    tensors["model.norm.weight"] = torch.ones(7)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    shutil.copy(os.path.join(src, "config.json"), tmp_path)
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has shape \(7,\), expected \(128,\)"):
        load_model(ModelConfig.from_pretrained(str(tmp_path)), str(tmp_path), progress=False)


def test_mtp_layer_is_loaded_into_mtp_module(hf_checkpoints: dict[str, str], tmp_path) -> None:
    """Checkpoint layer ``num_hidden_layers`` is the MTP module: its tensors land in ``mtp.0`` (sharing the
    embedding and head), and ``forward_mtp`` runs on them."""
    src = hf_checkpoints["v32"]
    tensors = load_file(os.path.join(src, "model.safetensors"))
    gen = torch.Generator().manual_seed(5)
    for name in [n for n in tensors if n.startswith("model.layers.2.")]:
        tensors[name.replace("model.layers.2.", "model.layers.3.")] = tensors[name] + 0.01
    extra = {"enorm.weight": torch.ones(128), "hnorm.weight": torch.ones(128),
             "eh_proj.weight": torch.randn(128, 256, generator=gen) * 0.02, "shared_head.norm.weight": torch.ones(128),
             "shared_head.head.weight": tensors["lm_head.weight"].clone(),
             "embed_tokens.weight": tensors["model.embed_tokens.weight"].clone()}
    tensors.update({f"model.layers.3.{k}": v for k, v in extra.items()})
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with open(os.path.join(src, "config.json")) as fh:
        config = json.load(fh)
    config["num_nextn_predict_layers"] = 1
    with open(tmp_path / "config.json", "w") as fh:
        json.dump(config, fh)
    cfg = ModelConfig.from_pretrained(str(tmp_path))
    plain = load_model(cfg, str(tmp_path), dtype="float32", progress=False)  # MTP tensors skipped
    assert len(plain.mtp) == 0
    model = load_model(cfg, str(tmp_path), dtype="float32", progress=False, with_mtp=True)
    assert torch.equal(model.mtp[0].eh_proj.weight, extra["eh_proj.weight"])
    assert torch.equal(model.mtp[0].block.self_attn.o_proj.weight,
                       tensors["model.layers.3.self_attn.o_proj.weight"])
    ids = torch.randint(0, VOCAB, (20,), generator=gen)
    cache = model.allocate_kv_cache(4, 16, "auto")
    batch = single_sequence_batch(ids, 0, [0, 1], 16)
    hidden = model(batch, cache)
    mtp_logits = model.compute_logits(model.forward_mtp(single_sequence_batch(ids.roll(-1), 0, [0, 1], 16), hidden,
                                                        cache))
    assert mtp_logits.shape == (20, VOCAB) and torch.isfinite(mtp_logits).all()


def test_dummy_weights_are_deterministic() -> None:
    config = ModelConfig.from_pretrained("tiny")
    a = load_model(config, None, load_format="dummy", dtype="float32", seed=3)
    b = load_model(config, None, load_format="dummy", dtype="float32", seed=3)
    c = load_model(config, None, load_format="dummy", dtype="float32", seed=4)
    wa, wb, wc = (m.model.layers[2].mlp.experts.gate_up_proj for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
