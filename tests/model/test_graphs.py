"""Compiled decode graphs (``dsv32.model.graphs``) compute what the eager step computes: for V3.2 (the indexer
selecting once contexts pass index_topk) and V3, batches padded to a capture size and batches beyond the largest
(eager), greedy tokens are identical and their logprobs agree within 1e-4 (float32); with MTP speculation too.
Compiling takes tens of seconds and runs the C++ compiler (processes): those tests are ``e2e``, outside
``make test-fast``."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from dsv32 import LLM, SamplingParams
from dsv32.config import EngineConfig, ModelConfig, tiny_config
from dsv32.model.batch import ForwardBatch
from dsv32.model.graphs import DEFAULT_CAPTURE_SIZES, _kept_guards, capture_sizes

ARCHS = {
    "v32": tiny_config(),
    "v3": tiny_config().with_overrides(architecture="DeepseekV3ForCausalLM", index_topk=0),
}
SIZES = [1, 2, 4]
_RNG = random.Random(0)
# Five sequences (more than the largest capture size: eager until two finish), of lengths around the tiny model's
# index_topk (64): some select from the start, one crosses it while decoding.
PROMPTS = [[_RNG.randrange(100, 120000) for _ in range(n)] for n in (7, 30, 90, 50, 66)]
MAX_TOKENS = [24, 20, 16, 12, 8]


def make_llm(model_config: ModelConfig, enforce_eager: bool, **kwargs: object) -> LLM:
    kwargs.setdefault("cuda_graph_sizes", SIZES)
    return LLM("tiny", model_config=model_config, dtype="float32", max_model_len=512, max_num_seqs=8, device="cpu",
               enforce_eager=enforce_eager, **kwargs)


def greedy(llm: LLM) -> list[tuple[list[int], list[float]]]:
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=0) for n in MAX_TOKENS]
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [(list(o.outputs[0].token_ids),
             [step[t].logprob for t, step in zip(o.outputs[0].token_ids, o.outputs[0].logprobs, strict=True)])
            for o in outs]


def assert_same(got: list[tuple[list[int], list[float]]], expected: list[tuple[list[int], list[float]]]) -> None:
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in expected]
    for (_, lp), (_, lp_expected) in zip(got, expected, strict=True):
        assert max(abs(a - b) for a, b in zip(lp, lp_expected, strict=True)) < 1e-4


_EAGER: dict[str, list[tuple[list[int], list[float]]]] = {}


def eager(arch: str) -> list[tuple[list[int], list[float]]]:
    if arch not in _EAGER:
        _EAGER[arch] = greedy(make_llm(ARCHS[arch], enforce_eager=True))
    return _EAGER[arch]


@pytest.mark.e2e
@pytest.mark.parametrize("arch", list(ARCHS))
def test_compiled_decode_matches_eager(arch: str) -> None:
    llm = make_llm(ARCHS[arch], enforce_eager=False)
    graphs = llm.engine.executor.model.decode_graphs
    assert graphs is not None and graphs.captured == set(SIZES)
    got = greedy(llm)
    assert graphs.steps_run > 0  # the decodes of four sequences and fewer ran on graphs
    assert_same(got, eager(arch))


@pytest.mark.e2e
def test_compiled_decode_under_mtp_speculation() -> None:
    llm = make_llm(ARCHS["v32"], enforce_eager=False,
                   speculative_config={"method": "mtp", "num_speculative_tokens": 1})
    assert [tokens for tokens, _ in greedy(llm)] == [tokens for tokens, _ in eager("v32")]


@pytest.mark.e2e
def test_captured_graphs_hold_their_weights_frozen() -> None:
    """The weights are constants of the compiled graph (packed for the CPU's GEMM once, at capture), not inputs read
    every step: a weight zeroed after capture changes the eager step only. (Traced without Inductor's freezing
    on, the weights stay graph inputs and every projection reorders its weight again each call.)"""
    llm = make_llm(ARCHS["v3"], enforce_eager=False, cuda_graph_sizes=[1])
    model, kv_cache = llm.engine.executor.model, llm.engine.runner.kv_cache
    graphs, scratch = model.decode_graphs, kv_cache.scratch_block

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():  # as the runner builds its batches
            batch = ForwardBatch(input_ids=torch.tensor([5]), positions=torch.tensor([0]), query_start_loc=[0, 1],
                                 seq_lens=[1], block_tables=torch.tensor([[scratch]]),
                                 slot_mapping=torch.tensor([scratch * kv_cache.block_size]))
            compiled = graphs.run(batch, kv_cache)
            assert compiled is not None
            model.decode_graphs = None  # the same step, eagerly
            try:
                return compiled.clone(), model(batch, kv_cache)
            finally:
                model.decode_graphs = graphs

    compiled, eager_hidden = step()
    torch.testing.assert_close(compiled, eager_hidden, rtol=1e-4, atol=1e-4)
    # The batch-1 LM head runs compiled too; more rows run eagerly.
    with torch.inference_mode():
        torch.testing.assert_close(graphs.logits(compiled), model.local_logits(compiled), rtol=1e-4, atol=1e-4)
        assert graphs.logits(compiled.expand(2, -1)) is None
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.zero_()
    compiled_after, eager_after = step()
    assert torch.equal(compiled_after, compiled)
    assert not torch.allclose(eager_after, eager_hidden, rtol=1e-4, atol=1e-4)


def test_kept_guards_are_the_ones_that_pick_a_graph() -> None:
    """Before each call dynamo checks the global state, the shape constraints, the input tensors and the identity of
    the frozen tensors, not the modules' structure (~1,000 guards, ~0.6 ms a step for the tiny model)."""
    entries = [SimpleNamespace(guard_type=kind) for kind in (
        "GLOBAL_STATE", "SHAPE_ENV", "TENSOR_MATCH", "ID_MATCH", "TYPE_MATCH", "EMPTY_NN_MODULE_HOOKS_DICT",
        "CONSTANT_MATCH")]
    assert _kept_guards(entries) == [True, True, True, True, False, False, False]


@pytest.mark.e2e
def test_two_models_in_one_process_keep_their_own_graphs() -> None:
    """Graphs of one model are never used for another model of the same shapes: the kept guards pin each graph to
    the tensors frozen into it."""
    config = ARCHS["v3"]
    first = make_llm(config, enforce_eager=False, cuda_graph_sizes=[1])
    # Another model of the same shapes whose steps differ: its routed experts count 10x as much.
    second = make_llm(config.with_overrides(routed_scaling_factor=25.0), enforce_eager=False, cuda_graph_sizes=[1])
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    for llm in (first, second):
        compiled = llm.generate([{"prompt_token_ids": PROMPTS[0]}], params, use_tqdm=False)[0].outputs[0].token_ids
        graphs = llm.engine.executor.model.decode_graphs
        llm.engine.executor.model.decode_graphs = None
        expected = llm.generate([{"prompt_token_ids": PROMPTS[0]}], params, use_tqdm=False)[0].outputs[0].token_ids
        llm.engine.executor.model.decode_graphs = graphs
        assert list(compiled) == list(expected)


def test_enforce_eager_compiles_nothing() -> None:
    llm = make_llm(ARCHS["v3"], enforce_eager=True)
    assert llm.engine.executor.model.decode_graphs is None


def test_capture_sizes() -> None:
    assert capture_sizes(64) == (1, 2, 4, 8, 16, 24, 32, 48, 64)
    assert capture_sizes(5) == (1, 2, 4, 5)  # max_num_seqs between two sizes is captured too
    assert capture_sizes(1000)[-1] == DEFAULT_CAPTURE_SIZES[-1]  # bigger batches run eagerly
    assert capture_sizes(8, [8, 1, 3, 16]) == (1, 3, 8)  # the user's sizes, up to max_num_seqs
    assert EngineConfig(cuda_graph_sizes=[2, 1]).cuda_graph_sizes == (2, 1)
