"""One model over two processes computes what one process computes, for V3.2 (indexer selecting: prompts longer than
index_topk) and V3, with chunked prefill mixed with decodes: logits agree within 1e-4 and 32 greedy tokens are
identical. Layouts: TP=2, TP=2 + EP (and SGLang's ``--tp 2 --ep 2``), and data-parallel attention over 2 ranks with
the MoE cut (``-dp 2``) or split by expert (``-dp 2 --enable-expert-parallel``, SGLang's ``--tp 2 --dp 2
--enable-dp-attention --ep 2``), where one prompt alone leaves a rank with nothing of its own to run."""

from __future__ import annotations

import random

import pytest
import torch

from dsv32 import SamplingParams
from dsv32.cli import build_parser, engine_config_from_args
from dsv32.engine.executor.multiproc import MultiprocExecutor
from tests.distributed.conftest import ARCHS, make_llm, prompt_logits

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("restore_threads")]

LONG_PROMPT = [random.Random(0).randrange(100, 120000) for _ in range(150)]  # > index_topk = 64
PROMPTS = [LONG_PROMPT[:90], LONG_PROMPT[10:40], LONG_PROMPT[:7], LONG_PROMPT, LONG_PROMPT[50:115]]
GREEDY = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)


def greedy_tokens(llm) -> list[list[int]]:  # noqa: ANN001 - an LLM
    """Each prompt's 32 greedy tokens, in one batch, then the last prompt again alone."""
    batch = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    alone = llm.generate([{"prompt_token_ids": PROMPTS[-1][::-1]}], GREEDY, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in batch + alone]


def _reference(arch: str) -> tuple[torch.Tensor, list[list[int]]]:
    """One process: the prompt's logits and the greedy tokens."""
    llm = make_llm(ARCHS[arch])
    return prompt_logits(llm, LONG_PROMPT), greedy_tokens(llm)


_REFERENCES: dict[str, tuple[torch.Tensor, list[list[int]]]] = {}


def reference(arch: str) -> tuple[torch.Tensor, list[list[int]]]:
    if arch not in _REFERENCES:
        _REFERENCES[arch] = _reference(arch)
    return _REFERENCES[arch]


def _cli_layout(*flags: str) -> dict[str, object]:
    """The engine fields the CLI makes of these flags."""
    config = engine_config_from_args(build_parser(["serve"]).parse_args(["serve", *flags]))
    return {"tensor_parallel_size": config.tensor_parallel_size, "data_parallel_size": config.data_parallel_size,
            "enable_expert_parallel": config.enable_expert_parallel}


LAYOUTS = {
    "tp2": lambda: _cli_layout("-tp", "2"),
    "tp2_ep": lambda: _cli_layout("-tp", "2", "--enable-expert-parallel"),
    "sglang_tp2_ep2": lambda: _cli_layout("--tp", "2", "--ep", "2"),
    "dp2_attention": lambda: _cli_layout("-dp", "2"),
    "sglang_dp2_attention_ep2": lambda: _cli_layout("--tp", "2", "--dp", "2", "--enable-dp-attention", "--ep", "2"),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_two_processes_match_one(arch: str, layout: str) -> None:
    expected_logits, expected_tokens = reference(arch)
    kwargs = LAYOUTS[layout]()
    llm = make_llm(ARCHS[arch], **kwargs)
    try:
        assert isinstance(llm.engine.executor, MultiprocExecutor)
        tokens = greedy_tokens(llm)
        logits = prompt_logits(llm, LONG_PROMPT)
    finally:
        llm.engine.close()
    assert tokens == expected_tokens
    assert logits.shape == expected_logits.shape
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout", ["tp2_ep", "sglang_dp2_attention_ep2"])
def test_mtp_speculation_under_parallelism(layout: str) -> None:
    """The MTP drafter's calls (its own cache layer, the shared head) run on every rank too: same greedy tokens."""
    expected = reference("v32")[1]
    llm = make_llm(ARCHS["v32"], **LAYOUTS[layout](),
                   speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    try:
        tokens = greedy_tokens(llm)
    finally:
        llm.engine.close()
    assert tokens == expected


def test_data_parallel_attention_holds_a_cache_per_rank() -> None:
    """Each attention rank keeps only its own sequences' cache: the engine schedules over both ranks' blocks, and a
    batch spreads over the ranks."""
    one = make_llm(ARCHS["v32"])
    llm = make_llm(ARCHS["v32"], **LAYOUTS["dp2_attention"]())
    try:
        assert llm.engine.block_manager.num_blocks == 2 * one.engine.block_manager.num_blocks
        llm.engine.add_request("a", PROMPTS[2], GREEDY)
        llm.engine.add_request("b", PROMPTS[1][:10], GREEDY)
        llm.engine.step()
        placed = [seq.dp_rank for seq in llm.engine.scheduler.running]
        for request_id in ("a", "b"):
            llm.engine.abort_request(request_id)
    finally:
        llm.engine.close()
    assert sorted(placed) == [0, 1]


def test_two_processes_with_compiled_decode_match_one() -> None:
    """TP=2 with both ranks' decode steps compiled (collectives inside the graphs) gives the eager one-process
    tokens (V3.2, the indexer selecting; V3's layers are a subset, and compiling costs minutes here)."""
    _, expected_tokens = reference("v32")
    llm = make_llm(ARCHS["v32"], tensor_parallel_size=2, enforce_eager=False, cuda_graph_sizes=[1, 8])
    try:
        tokens = greedy_tokens(llm)
        graphs = llm.engine.executor.model.model.decode_graphs  # rank 0 runs in this process
        steps_run = graphs.steps_run if graphs is not None else 0
    finally:
        llm.engine.close()
    assert tokens == expected_tokens
    assert steps_run > 0
