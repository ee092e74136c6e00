"""KV-cache sizing from a memory budget, and max_model_len checks (pure arithmetic, no model)."""

import pytest

from dsv32.config import EngineConfig, tiny_config
from dsv32.engine.runner import DEFAULT_CPU_KV_CACHE_BYTES, plan_kv_cache

BYTES_PER_TOKEN = 1000


def test_explicit_budget_sets_blocks_and_default_max_model_len():
    plan = plan_kv_cache(EngineConfig(kv_cache_memory=10 * 64 * BYTES_PER_TOKEN + 5), tiny_config(),
                         BYTES_PER_TOKEN, budget_bytes=None)
    assert plan.num_blocks == 10 and plan.max_tokens == 640
    assert plan.max_model_len == 640  # the cache holds less than max_position_embeddings


def test_cpu_default_is_capped_by_what_max_num_seqs_full_sequences_need():
    small = plan_kv_cache(EngineConfig(max_model_len=100, max_num_seqs=4), tiny_config(), BYTES_PER_TOKEN, None)
    assert small.num_blocks == 4 * 2  # 100 tokens round up to 2 blocks per sequence
    assert small.max_model_len == 100
    large = plan_kv_cache(EngineConfig(), tiny_config(), BYTES_PER_TOKEN, None)
    assert large.num_bytes <= DEFAULT_CPU_KV_CACHE_BYTES
    assert large.max_model_len == min(tiny_config().max_position_embeddings, large.max_tokens)


def test_measured_gpu_budget_is_used_when_no_explicit_budget():
    plan = plan_kv_cache(EngineConfig(), tiny_config(), BYTES_PER_TOKEN, budget_bytes=3 * 64 * BYTES_PER_TOKEN)
    assert plan.num_blocks == 3


def test_max_model_len_larger_than_the_cache_is_a_clear_error():
    with pytest.raises(ValueError, match="estimated maximum model length is 640"):
        plan_kv_cache(EngineConfig(max_model_len=1000, kv_cache_memory=10 * 64 * BYTES_PER_TOKEN), tiny_config(),
                      BYTES_PER_TOKEN, None)


def test_max_model_len_beyond_the_model_context_is_rejected():
    too_long = tiny_config().max_position_embeddings + 1
    with pytest.raises(ValueError, match="greater than the derived max_model_len"):
        plan_kv_cache(EngineConfig(max_model_len=too_long), tiny_config(), BYTES_PER_TOKEN, None)


def test_no_room_for_a_single_block():
    with pytest.raises(ValueError, match="No memory left for the KV cache"):
        plan_kv_cache(EngineConfig(kv_cache_memory=100), tiny_config(), BYTES_PER_TOKEN, None)
