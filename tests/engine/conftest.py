"""Shared engines for the engine tests (the tiny model, float32 so batched and single runs agree), built once per
session, and the check that every test leaves every KV block free."""

from __future__ import annotations

import random

import pytest

from dsv32 import LLM
from dsv32.config import tiny_config

_ENGINES: dict[str, LLM] = {}

# Small enough that prompts above 64 tokens are prefilled in chunks mixed with other sequences' decodes.
CHUNKED_BUDGET = 64


def make_engine(name: str, **kwargs) -> LLM:
    """One engine per distinct configuration, reused across tests (loading costs seconds)."""
    if name not in _ENGINES:
        kwargs.setdefault("dtype", "float32")
        kwargs.setdefault("max_model_len", 512)
        kwargs.setdefault("max_num_seqs", 8)
        kwargs.setdefault("max_num_batched_tokens", CHUNKED_BUDGET)
        kwargs.setdefault("device", "cpu")
        _ENGINES[name] = LLM("tiny", **kwargs)
    return _ENGINES[name]


@pytest.fixture(scope="session")
def v32() -> LLM:
    return make_engine("v32")


@pytest.fixture(scope="session")
def v3() -> LLM:
    return make_engine("v3", model_config=tiny_config().with_overrides(architecture="DeepseekV3ForCausalLM",
                                                                       index_topk=0))


@pytest.fixture(autouse=True)
def no_leaked_blocks():
    yield
    for name, llm in _ENGINES.items():
        core = llm.engine
        assert not core.has_unfinished_requests(), f"{name}: requests left behind"
        assert core.block_manager.num_free_blocks == core.block_manager.num_blocks, f"{name}: leaked KV blocks"
        assert core.scheduler.num_running == core.scheduler.num_waiting == 0


def token_prompts(lengths: list[int], seed: int = 0) -> list[dict]:
    """Random prompts of the given lengths, as token ids from the ordinary (non-special) vocabulary."""
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(100, 100_000) for _ in range(n)]} for n in lengths]
