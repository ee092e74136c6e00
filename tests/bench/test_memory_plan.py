"""``benchmarks/memory_plan.py``: its tensor inventory is the real checkpoint's (parameter and scale counts), its shards
add back up to the whole model, its KV bytes per token are the cache format's, and its token counts follow from the
budget the way the engine plans the cache."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dsv32.config import ModelConfig
from dsv32.kernels.cache_format import CacheLayout
from tests.benchmark_scripts import benchmark_module

# spec/model.md section 8: the checkpoint's counts. Main model (no layer 61) and the MTP layer with its copies of the
# embedding and LM head; block-scale elements of the whole checkpoint (main + MTP).
MAIN_PARAMS = 671_877_944_064
MTP_PARAMS_WITH_COPIES = 13_477_385_728
CHECKPOINT_SCALES = 41_591_584


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("memory_plan.py") as module:
        yield module


@pytest.fixture(scope="module")
def model(bench):
    return bench.build_model(ModelConfig(), with_mtp=False)


@pytest.fixture(scope="module")
def model_mtp(bench):
    return bench.build_model(ModelConfig(), with_mtp=True)


def test_parameter_count_is_the_real_models(bench, model, model_mtp) -> None:
    main = bench.checkpoint_param_count(bench.enumerate_tensors(model))
    assert abs(main - 671e9) / 671e9 < 0.01
    assert main == MAIN_PARAMS
    c = ModelConfig()
    # dsv32's MTP layer shares the main embedding and LM head; the checkpoint stores copies of both.
    mtp = bench.checkpoint_param_count(bench.enumerate_tensors(model_mtp)) - main
    assert mtp + 2 * c.vocab_size * c.hidden_size == MTP_PARAMS_WITH_COPIES
    assert bench.scale_count(bench.enumerate_tensors(model_mtp)) == CHECKPOINT_SCALES


def test_dtypes_are_what_dsv32_keeps(bench, model) -> None:
    by_name = {s.name: s for s in bench.enumerate_tensors(model)}
    layer = "model.layers.3."
    assert by_name[layer + "self_attn.q_b_proj.weight"].fp8
    assert by_name[layer + "mlp.experts.gate_up_proj"].fp8
    assert by_name[layer + "self_attn.indexer.wq_b.weight"].fp8
    assert by_name[layer + "self_attn.q_b_proj.weight_scale_inv"].itemsize == 4
    assert by_name["lm_head.weight"].itemsize == 2 and by_name["model.embed_tokens.weight"].itemsize == 2
    assert by_name[layer + "mlp.gate.weight"].itemsize == 4  # router kept in fp32 (bf16 in the checkpoint)
    assert by_name[layer + "self_attn.indexer.weights_proj.weight"].itemsize == 4
    # Made at load for the absorbed MLA, in bf16: kv_b dequantised, and W_UK / W_UV as their own (contiguous) copies.
    derived = {name: spec for name, spec in by_name.items() if name.startswith(layer + "self_attn.mla_weights.")}
    assert {name.rsplit(".", 1)[1]: spec.shape for name, spec in derived.items()} == {
        "w_kvb": (32768, 512), "w_uk": (128, 128, 512), "w_uv": (128, 512, 128)}
    assert all(spec.itemsize == 2 and spec.role == "attn_column" for spec in derived.values())


@pytest.mark.parametrize("layout_name", ["TP8", "TP8_EP8", "DP8_EP8"])
def test_shards_sum_back_to_the_whole_model(bench, model, layout_name: str) -> None:
    layout = getattr(bench, layout_name)
    specs = bench.enumerate_tensors(model)
    total = sum(s.nbytes for s in specs)
    replicated = sum(s.nbytes for s in specs if not layout.is_split(s))
    for s in specs:
        assert layout.shard_bytes(s) * (layout.world_size if layout.is_split(s) else 1) == s.nbytes, s.name
    per_gpu = layout.weight_bytes_per_gpu(specs)
    assert per_gpu * layout.world_size == total + (layout.world_size - 1) * replicated
    assert replicated < total / 10  # what every GPU repeats is small next to the experts


def test_layouts_split_as_described(bench, model) -> None:
    by_name = {s.name: s for s in bench.enumerate_tensors(model)}
    layer = "model.layers.10."
    q_b, o = by_name[layer + "self_attn.q_b_proj.weight"], by_name[layer + "self_attn.o_proj.weight"]
    gate_up, down = by_name[layer + "mlp.experts.gate_up_proj"], by_name[layer + "mlp.experts.down_proj"]
    wq_b = by_name[layer + "self_attn.indexer.wq_b.weight"]
    embed = by_name["model.embed_tokens.weight"]
    # TP8: 16 of 128 heads (x 192 q dims), o_proj's input split the same way; experts split along I = 2048.
    assert bench.TP8.shard_shape(q_b) == (16 * 192, 1536)
    assert bench.TP8.shard_shape(o) == (7168, 16 * 128)
    assert bench.TP8.shard_shape(gate_up) == (256, 2 * 256, 7168)
    assert bench.TP8.shard_shape(down) == (256, 7168, 256)
    assert bench.TP8.shard_shape(wq_b) == wq_b.shape
    assert bench.TP8.shard_shape(embed) == (129280 // 8, 7168)
    # EP8: 32 whole experts per GPU.
    assert bench.TP8_EP8.shard_shape(gate_up) == (32, 2 * 2048, 7168)
    assert bench.TP8_EP8.shard_shape(down) == (32, 7168, 2048)
    # DP attention (dsv32/distributed/parallel.py, SGLang's default): attention and embedding replicated; dense MLP,
    # shared expert and head split over all 8; experts EP8.
    shared = by_name[layer + "mlp.shared_experts.down_proj.weight"]
    dense = by_name["model.layers.0.mlp.gate_proj.weight"]
    assert bench.TP8.shard_shape(shared) == (7168, 2048 // 8) and bench.TP8.shard_shape(dense) == (18432 // 8, 7168)
    for replicated in (q_b, embed):
        assert bench.DP8_EP8.shard_shape(replicated) == replicated.shape
    assert bench.DP8_EP8.shard_shape(shared) == (7168, 2048 // 8)
    assert bench.DP8_EP8.shard_shape(dense) == (18432 // 8, 7168)
    assert bench.DP8_EP8.shard_shape(by_name["lm_head.weight"]) == (129280 // 8, 7168)
    assert bench.DP8_EP8.shard_shape(gate_up) == (32, 2 * 2048, 7168)


def test_a_split_that_breaks_an_fp8_block_is_refused(bench, model) -> None:
    down = next(s for s in bench.enumerate_tensors(model) if s.name.endswith("mlp.experts.down_proj"))
    tp32 = dataclasses.replace(bench.TP8, world_size=32)  # 2048 / 32 = 64 < one 128-column block
    with pytest.raises(ValueError, match="FP8 blocks"):
        tp32.shard_shape(down)


def test_kv_bytes_per_token_are_the_cache_formats(bench, model, model_mtp) -> None:
    c = ModelConfig()
    tp8, tp8_mtp = bench.plan(model)[0], bench.plan(model_mtp)[0]
    assert tp8.layout is bench.TP8
    for fmt, per_layer in (("auto", 1152 + 256), ("fp8", 656 + 132)):
        layout = CacheLayout(c.kv_lora_rank, c.qk_rope_head_dim, c.index_head_dim, fmt, torch.bfloat16)
        assert layout.bytes_per_token() == per_layer
        assert tp8.kv_bytes_per_token[fmt] == per_layer * c.num_hidden_layers
        assert tp8_mtp.kv_bytes_per_token[fmt] == per_layer * (c.num_hidden_layers + 1)
    assert tp8.kv_bytes_per_token["fp8"] == 48_068  # spec/model.md section 9


def test_tokens_follow_from_the_budget(bench, model) -> None:
    reserve = 6 * bench.GiB
    rows = bench.plan(model, utilization=0.9, reserve_bytes=reserve, block_size=64)
    assert len(rows) == len(bench.LAYOUTS) * len(bench.GPUS)
    for row in rows:
        for fmt in bench.KV_CACHE_DTYPES:
            budget = int(row.gpu.capacity * 0.9) - row.weight_bytes - reserve
            block = row.kv_bytes_per_token[fmt] * 64
            assert row.tokens_per_gpu[fmt] == budget // block * 64 > 0
            copies = 1 if row.layout.kv_replicated else 8
            assert row.cluster_tokens(fmt) == copies * row.tokens_per_gpu[fmt]
    # No room at all is zero tokens, not an error.
    tiny = dataclasses.replace(bench.GPUS[0], capacity=bench.GiB)
    assert bench.plan(model, gpus=(tiny,))[0].tokens_per_gpu["auto"] == 0


def test_main_prints_one_row_per_layout_and_gpu(bench, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main([]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| TP8") or line.startswith("| DP8")]
    assert len(rows) == len(bench.LAYOUTS) * len(bench.GPUS)
    assert "671.88B" in out and "routed experts" in out


def test_online_int_weights_cost_what_their_codes_cost(bench) -> None:
    """``--weights int8`` / ``int4``: the covered weights at 1 byte (+ a bf16 scale per row) and half a byte (+ a bf16
    pair per 128 columns), the rest bf16, the same elements counted as held."""
    bf16_model = bench.build_model(bench.ModelConfig(), with_mtp=False, weights="int8")
    totals = {}
    for weights in ("int8", "int4"):
        specs = bench.enumerate_tensors(bf16_model, weights)
        totals[weights] = sum(s.nbytes for s in specs)
        assert bench.checkpoint_param_count(specs) == pytest.approx(671.88e9, rel=1e-3)
    bf16 = sum(t.numel() * t.element_size() for t in (*bf16_model.parameters(), *bf16_model.buffers()))
    assert 0.5 < totals["int8"] / bf16 < 0.53
    assert 0.26 < totals["int4"] / bf16 < 0.29
    rows = bench.plan(bf16_model, layouts=bench.make_layouts(8)[:1], gpus=bench.A100_GPUS[-1:], weights="int8")
    assert rows[0].weight_bytes > rows[0].gpu.capacity  # 8x A100-40GB cannot hold V3.2 in int8
