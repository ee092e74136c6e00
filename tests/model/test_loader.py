"""Checkpoint loading: FP8 block-quantised weights, sharded index files, and clear errors for bad checkpoints."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv32.config import ModelConfig
from dsv32.kernels.fp8 import FP8_DTYPE, quantize_block_fp8
from dsv32.model.linear import Linear
from dsv32.model.loader import SCALE_SUFFIX, CheckpointError, _map_name, load_model

from .conftest import VOCAB, make_hf_checkpoint, single_sequence_batch


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


@pytest.fixture(scope="module")
def fp8_checkpoint_whole_blocks(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A V3.2 FP8 checkpoint whose experts keep whole gate/up scale blocks (moe_intermediate_size 128)."""
    root = tmp_path_factory.mktemp("fp8_i128")
    src = make_hf_checkpoint(str(root / "hf"), "v32", moe_intermediate_size=128)
    _write_fp8_checkpoint(src, str(root / "fp8"))
    return str(root / "fp8")


def _logits(model) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(0))
    cache = model.allocate_kv_cache(4, 16, "auto")
    return model.compute_logits(model(single_sequence_batch(ids, 0, [0, 1, 2], 16), cache))


def _storage_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def test_keep_fp8_stores_e4m3_with_scales_and_matches_dequantised_load(fp8_checkpoint_whole_blocks: str) -> None:
    path = fp8_checkpoint_whole_blocks
    config = ModelConfig.from_pretrained(path)
    kept = load_model(config, path, dtype="float32", progress=False, keep_fp8=True)
    dense = load_model(config, path, dtype="float32", progress=False, keep_fp8=False)
    assert load_model(config, path, dtype="float32", progress=False).model.layers[1].self_attn.q_b_proj.weight.dtype \
        == torch.float32  # CPU default: dequantise on load

    attn, experts = kept.model.layers[1].self_attn, kept.model.layers[1].mlp.experts
    assert attn.q_b_proj.weight.dtype == FP8_DTYPE and attn.q_b_proj.weight_scale_inv.shape == (2, 1)  # 192 x 64
    assert attn.kv_b_proj.weight.dtype == FP8_DTYPE  # read by MLA directly
    assert experts.gate_up_proj.dtype == FP8_DTYPE and experts.gate_up_proj_scale_inv.shape == (8, 2, 1)
    assert experts.down_proj.dtype == FP8_DTYPE and experts.down_proj_scale_inv.shape == (8, 1, 1)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
                 "model.layers.1.self_attn.indexer.weights_proj.weight", "model.norm.weight"):
        assert kept.get_parameter(name).dtype == torch.float32, name
    dense_params = dict(dense.named_parameters())
    for name, module in kept.named_modules():
        if isinstance(module, Linear):
            assert torch.equal(module.dequantized_weight(), dense_params[f"{name}.weight"]), name
    # the up half of expert 3's scales is the checkpoint's up_proj scale, not the gate's
    shard = {k: v for f in os.listdir(path) if f.endswith(".safetensors")
             for k, v in load_file(os.path.join(path, f)).items()}
    prefix = "model.layers.1.mlp.experts.3"
    gate_scale = shard[f"{prefix}.gate_proj.weight{SCALE_SUFFIX}"]
    up_scale = shard[f"{prefix}.up_proj.weight{SCALE_SUFFIX}"]
    assert torch.equal(experts.gate_up_proj_scale_inv[3], torch.cat((gate_scale, up_scale)))
    up = shard[f"{prefix}.up_proj.weight"]
    assert torch.equal(experts.gate_up_proj[3, 128:].view(torch.uint8), up.view(torch.uint8))

    torch.testing.assert_close(_logits(kept), _logits(dense), atol=1e-5, rtol=0)
    assert kept.kv_cache_bytes_per_token("auto") == dense.kv_cache_bytes_per_token("auto")
    # each kept e4m3 weight costs 1 byte per value (not 4) plus one fp32 scale per block
    saved = sum(shard[n[:-len(SCALE_SUFFIX)]].numel() * 3 - shard[n].numel() * 4 for n in shard
                if n.endswith(SCALE_SUFFIX) and _map_name(n, config, with_mtp=False) is not None)
    assert saved > 0 and _storage_bytes(dense) - _storage_bytes(kept) == saved


def test_keep_fp8_refuses_gate_up_scales_that_straddle_blocks(hf_checkpoints: dict[str, str], tmp_path) -> None:
    """moe_intermediate_size 64: gate and up rows share one 128-row scale block of the stacked tensor."""
    _write_fp8_checkpoint(hf_checkpoints["v32"], str(tmp_path / "fp8"))
    config = ModelConfig.from_pretrained(str(tmp_path / "fp8"))
    with pytest.raises(CheckpointError, match=r"moe_intermediate_size 64 is not a multiple of 128.*keep_fp8=False"):
        load_model(config, str(tmp_path / "fp8"), dtype="float32", progress=False, keep_fp8=True)


@pytest.mark.parametrize(("name", "bad", "expected"), [
    ("model.layers.1.self_attn.q_b_proj.weight_scale_inv", (1, 1), r"\(2, 1\) for a 192x64 weight"),
    ("model.layers.2.mlp.experts.5.up_proj.weight_scale_inv", (1, 2), r"\(1, 1\) for a 128x128 weight"),
])
@pytest.mark.parametrize("keep_fp8", [False, True])
def test_bad_scale_shape_is_named(fp8_checkpoint_whole_blocks: str, tmp_path, name: str, bad: tuple[int, int],
                                  expected: str, keep_fp8: bool) -> None:
    path = str(tmp_path / "ckpt")
    shutil.copytree(fp8_checkpoint_whole_blocks, path)
    with open(os.path.join(path, "model.safetensors.index.json")) as fh:
        file = os.path.join(path, json.load(fh)["weight_map"][name])
    tensors = load_file(file)
    tensors[name] = torch.ones(bad)
    save_file(tensors, file)
    with pytest.raises(CheckpointError, match=rf"{name}: weight_scale_inv has shape \({bad[0]}, {bad[1]}\), "
                                              rf"expected {expected}"):
        load_model(ModelConfig.from_pretrained(path), path, dtype="float32", progress=False, keep_fp8=keep_fp8)


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
    mtp_logits = model.compute_mtp_logits(model.forward_mtp(single_sequence_batch(ids.roll(-1), 0, [0, 1], 16),
                                                            hidden, cache))
    assert mtp_logits.shape == (20, VOCAB) and torch.isfinite(mtp_logits).all()


def test_dummy_weights_are_deterministic() -> None:
    config = ModelConfig.from_pretrained("tiny")
    a = load_model(config, None, load_format="dummy", dtype="float32", seed=3)
    b = load_model(config, None, load_format="dummy", dtype="float32", seed=3)
    c = load_model(config, None, load_format="dummy", dtype="float32", seed=4)
    wa, wb, wc = (m.model.layers[2].mlp.experts.gate_up_proj for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
