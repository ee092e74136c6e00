"""``benchmarks/roofline.py``'s byte model: its weight bytes are exactly the parameters dsv32's model holds, the
routed-expert term follows the expected distinct experts, the KV term reads the top-k rows (dsv32) or every row
(llama.cpp), and the checkpoint made shrinks its experts to fit in memory."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dsv32.config import ModelConfig
from dsv32.model.deepseek import DeepseekForCausalLM
from tests.benchmark_scripts import benchmark_module


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("roofline.py") as module:
        yield module


def _parameter_bytes(config: ModelConfig, dtype: torch.dtype) -> int:
    with torch.device("meta"):
        model = DeepseekForCausalLM(config, dtype)
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("variant", ["v32", "v3"])
def test_weight_bytes_are_the_models_parameters(bench, variant: str) -> None:
    config = ModelConfig.from_pretrained("tiny").with_overrides(quantization=None)
    if variant == "v3":
        config = config.with_overrides(architecture="DeepseekV3ForCausalLM", index_topk=0)
    assert bench.all_weight_bytes(config, 2) == _parameter_bytes(config, torch.bfloat16)
    assert bench.all_weight_bytes(config, 4) == _parameter_bytes(config, torch.float32)


def test_routed_experts_read_are_the_expected_distinct_ones(bench) -> None:
    assert bench.expected_experts(64, 2, 1) == pytest.approx(2)
    assert 2 < bench.expected_experts(64, 2, 8) < 16
    assert bench.expected_experts(8, 2, 1000) == pytest.approx(8)
    config = ModelConfig.from_pretrained("tiny")
    one, eight = (bench.decode_step_bytes(config, b, 100) for b in (1, 8))
    moe_layers = config.num_hidden_layers - config.first_k_dense_replace
    expert = 2 * 3 * config.hidden_size * config.moe_intermediate_size
    assert one.routed_experts == moe_layers * config.num_experts_per_tok * expert
    assert eight.routed_experts == pytest.approx(moe_layers * bench.expected_experts(16, 4, 8) * expert)
    # Every weight is read once per step whatever the batch; embeddings and KV grow with it.
    same = ("attention", "indexer", "dense_ffn", "router", "shared_experts", "lm_head")
    assert all(getattr(one, name) == getattr(eight, name) for name in same)
    assert eight.embeddings == 8 * one.embeddings and eight.kv_cache == 8 * one.kv_cache


def test_kv_term_reads_top_k_rows_or_every_row(bench) -> None:
    config = ModelConfig.from_pretrained("tiny")  # kv_lora 512 + rope 64, indexer keys 128, top-k 64, 4 layers
    latent, index = 2 * 576, 2 * 128
    assert bench.decode_step_bytes(config, 1, 50).kv_cache == 4 * 50 * latent  # T <= top-k: no index scores
    assert bench.decode_step_bytes(config, 1, 144).kv_cache == 4 * (64 * latent + 144 * index)
    dense = bench.decode_step_bytes(config, 1, 144, dense_attention=True)
    assert dense.kv_cache == 4 * 144 * (latent + index)
    v3 = dataclasses.replace(config, architecture="DeepseekV3ForCausalLM", index_topk=0)
    assert bench.decode_step_bytes(v3, 1, 144).kv_cache == 4 * 144 * latent


def test_the_checkpoint_made_fits_in_memory(bench) -> None:
    need = bench.estimated_parameters(2048, 8, 64) * bench.BYTES_PER_PARAM_TO_MAKE
    assert bench.fitting_experts(2048, 8, 64, need) == 64
    assert bench.fitting_experts(2048, 8, 64, need * 0.9) == 32
    assert bench.fitting_experts(2048, 8, 64, 0) == bench.MIN_EXPERTS
