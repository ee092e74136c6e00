"""Each rank holds what the memory plan (``benchmarks/memory_plan.py``) says: its parameter bytes, built by dsv32's own
sharded model, equal the plan's per-GPU figure for every layout (tiny V3.2 over 2 ranks), the ranks' shards add up to
the whole model plus the replicated parts, and a loaded rank holds exactly its slice of the full-shape weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dsv32.config import tiny_config
from dsv32.distributed.parallel import ParallelContext
from dsv32.model.deepseek import DeepseekForCausalLM
from dsv32.model.loader import load_model
from dsv32.model.mla import MLA
from tests.benchmark_scripts import benchmark_module

WORLD = 2


@pytest.fixture(scope="module")
def plan():
    with benchmark_module("memory_plan.py") as module:
        yield module


def shard(rank: int, layout: str) -> DeepseekForCausalLM:
    parallel = ParallelContext(rank, WORLD, expert_parallel="EP" in layout, data_parallel=layout.startswith("DP"))
    with torch.device("meta"):
        return DeepseekForCausalLM(tiny_config(), torch.bfloat16, parallel=parallel)


def parameter_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("index", range(3))
def test_each_rank_holds_what_the_plan_says(plan, index: int) -> None:
    layout = plan.make_layouts(WORLD)[index]
    with torch.device("meta"):
        whole = DeepseekForCausalLM(tiny_config(), torch.bfloat16)
        for module in whole.modules():
            if isinstance(module, MLA):
                module.prepare_weights()
    names = {name for name, _ in whole.named_parameters()}
    specs = [s for s in plan.enumerate_tensors(whole) if s.name in names]
    expected = layout.weight_bytes_per_gpu(specs)
    ranks = [parameter_bytes(shard(rank, layout.name)) for rank in range(WORLD)]
    assert ranks == [expected] * WORLD, (layout.name, ranks, expected)
    replicated = sum(s.nbytes for s in specs if not layout.is_split(s))
    assert sum(ranks) == parameter_bytes(whole) + (WORLD - 1) * replicated


@pytest.mark.parametrize("expert_parallel", [False, True])
def test_a_rank_loads_exactly_its_slice(expert_parallel: bool) -> None:
    """Dummy weights: drawn at full shape and cut, so rank r's tensors are the slices of the one-process model's."""
    config = tiny_config()
    whole = load_model(config, None, "dummy", "float32")
    full = dict(whole.named_parameters())
    for rank in range(WORLD):
        part = load_model(config, None, "dummy", "float32",
                          parallel=ParallelContext(rank, WORLD, expert_parallel=expert_parallel))
        params = dict(part.named_parameters())
        q_b = "model.layers.0.self_attn.q_b_proj.weight"
        rows = params[q_b].shape[0]
        torch.testing.assert_close(params[q_b], full[q_b][rank * rows:(rank + 1) * rows], rtol=0, atol=0)
        o = "model.layers.0.self_attn.o_proj.weight"
        cols = params[o].shape[1]
        torch.testing.assert_close(params[o], full[o][:, rank * cols:(rank + 1) * cols], rtol=0, atol=0)
        torch.testing.assert_close(params["model.layers.0.self_attn.indexer.wk.weight"],
                                   full["model.layers.0.self_attn.indexer.wk.weight"], rtol=0, atol=0)
        experts = "model.layers.1.mlp.experts.down_proj"
        if expert_parallel:
            count = config.n_routed_experts // WORLD
            expected = full[experts][rank * count:(rank + 1) * count]
        else:
            inter = config.moe_intermediate_size // WORLD
            expected = full[experts][:, :, rank * inter:(rank + 1) * inter]
        torch.testing.assert_close(params[experts], expected, rtol=0, atol=0)


def test_the_layout_is_immutable_and_per_step_counts_come_with_the_call() -> None:
    parallel = ParallelContext(1, WORLD, data_parallel=True)
    assert (parallel.tp_rank, parallel.tp_size) == (0, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        parallel.rank = 0  # type: ignore[misc]
    with pytest.raises(ValueError, match="rank_token_counts"):
        parallel.gather_tokens(torch.zeros(2, 4), None)
