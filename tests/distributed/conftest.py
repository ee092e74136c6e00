"""Engines for the parallelism tests: the tiny model in float32 (so sums in another order agree to ~1e-6), one
process per rank on the CPU (gloo), each rank one thread; and the one-process reference for each architecture."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from dsv32 import LLM
from dsv32.config import ModelConfig, tiny_config
from dsv32.model.batch import ForwardBatch

ARCHS = {
    "v32": tiny_config(),
    "v3": tiny_config().with_overrides(architecture="DeepseekV3ForCausalLM", index_topk=0),
}
# Prompts above the tiny model's index_topk (64) make the indexer select; a 32-token budget chunks them, mixed with
# the other sequences' decodes.
CHUNKED_BUDGET = 32


def make_llm(model_config: ModelConfig, **kwargs: object) -> LLM:
    return LLM("tiny", model_config=model_config, dtype="float32", max_model_len=512, max_num_seqs=8,
               max_num_batched_tokens=CHUNKED_BUDGET, device="cpu", **kwargs)


@pytest.fixture
def restore_threads() -> Iterator[None]:
    """A driver sets this process's thread count to its share of the cores: give it back afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def prompt_logits(llm: LLM, token_ids: list[int]) -> torch.Tensor:
    """Logits ``[len, vocab]`` of every position of one prompt, prefilled in one forward through the engine's model
    handle (every rank runs it; with data-parallel attention rank 1 has no tokens of its own and still joins the
    MoE). Uses the first blocks of the cache, then clears the prefix cache."""
    runner = llm.engine.runner
    block_size = runner.block_size
    num_blocks = math.ceil(len(token_ids) / block_size)
    positions = torch.arange(len(token_ids))
    tables = torch.arange(num_blocks).view(1, -1)
    data_parallel = llm.engine.engine_config.data_parallel_size > 1
    batch = ForwardBatch(input_ids=torch.tensor(token_ids), positions=positions, query_start_loc=[0, len(token_ids)],
                         seq_lens=[len(token_ids)], block_tables=tables, slot_mapping=positions.clone(),
                         dp_ranks=[0] if data_parallel else None)  # with data-parallel attention: rank 0's cache
    logits = runner.model.compute_logits(runner.model(batch, runner.kv_cache))
    assert llm.engine.reset_prefix_cache()
    return logits
