"""``benchmarks/gpu_layer.py`` off the GPU: it refuses in one line, its FLOP/byte accounting matches the spec's
parameter counts, and its whole measuring pipeline (our layer with FP8 experts, HF's layer with the same weights and
the same cached context) runs at toy width on CPU with both layers agreeing."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dsv32.config import tiny_config
from tests.benchmark_scripts import benchmark_module


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("gpu_layer.py") as module:
        yield module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_refuses_in_one_line_without_cuda(bench, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main([]) == 1
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no CUDA device" in out


def test_linear_flops_match_the_real_parameter_counts(bench) -> None:
    # spec section 8 shapes: q_a [1536,7168], q_b [24576,1536], kv_a [576,7168], kv_b [32768,512], o [7168,16384];
    # indexer wq_b [8192,1536], wk [128,7168], weights_proj [64,7168]; router [256,7168]; experts 3 x [2048,7168]
    attention = 1536 * 7168 + 24576 * 1536 + 576 * 7168 + 32768 * 512 + 7168 * 16384
    indexer = 8192 * 1536 + 128 * 7168 + 64 * 7168
    assert indexer + 2 * 128 == 13_959_424  # the spec's "indexer adds 13,959,424 params per layer" (with k_norm)
    per_token = attention + indexer + 256 * 7168 + (1 + 8) * 3 * 2048 * 7168
    assert bench.linear_flops_per_token(bench.real_config()) == 2 * per_token


def test_decode_bytes_count_touched_experts_and_sparse_kv(bench) -> None:
    config = dataclasses.replace(tiny_config(), index_topk=16)
    layer = bench.build_layer(config, torch.device("cpu"), torch.bfloat16, fp8_experts=True)
    dense, per_expert = bench.weight_bytes(layer)
    inter, hidden = config.moe_intermediate_size, config.hidden_size
    assert per_expert == 3 * inter * hidden + 4 * (2 * inter // 128 * hidden // 128 + hidden // 128 * inter // 128)
    layout = bench.allocate_cache(config, "fp8", torch.bfloat16, 64, torch.device("cpu")).layout
    assert (layout.latent_width, layout.index_width) == (656, 132)
    work = bench.decode_work(config, layer, layout, batch=3, length=99, distinct_experts=5)
    assert work.bytes == dense + 5 * per_expert + 3 * (16 * 656 + 100 * 132)
    short = bench.decode_work(config, layer, layout, batch=3, length=9, distinct_experts=5)
    assert short.bytes == dense + 5 * per_expert + 3 * 10 * 656  # no indexer pass while the context fits top-k


@pytest.mark.parametrize(("case", "batch", "length"), [("decode", 2, 20), ("prefill", 1, 24)])
def test_pipeline_runs_and_our_layer_agrees_with_hf(bench, case: str, batch: int, length: int) -> None:
    """fp32 + unrounded cache so the two layers compute the same function; the indexer prunes (top-16 of 20+)."""
    config = dataclasses.replace(tiny_config(), index_topk=16)
    device = torch.device("cpu")
    layer = bench.build_layer(config, device, torch.float32, fp8_experts=True)
    hf_layer = bench.build_hf_layer(config, layer, device, torch.float32)
    cache = bench.allocate_cache(config, "auto", torch.float32, 256, device)
    result = bench.run_case(case, config, layer, hf_layer, cache, batch, length, torch.float32, None,
                            use_graph=False, warmup=0, iters=1)
    assert result.hf_note == "ok" and result.hf_ms is not None and result.ms > 0
    assert result.max_rel_diff is not None and result.max_rel_diff < 1e-4
    assert result.tokens == batch * (1 if case == "decode" else length)
    assert result.bw_frac is None and result.gbps > 0 and result.tflops > 0
