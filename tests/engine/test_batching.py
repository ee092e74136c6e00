"""Continuous batching is invisible in the output: batched greedy == one request at a time, for V3.2 and V3."""

import pytest

from dsv32 import SamplingParams

from .conftest import token_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=1)
# Mixed lengths: short, one chunk, and two prompts longer than the chunk budget and than index_topk (64), so the
# V3.2 indexer prunes and prefill chunks run next to other sequences' decodes.
LENGTHS = [3, 40, 97, 150]


@pytest.mark.parametrize("engine", ["v32", "v3"])
def test_batched_greedy_equals_one_at_a_time(engine, request):
    llm = request.getfixturevalue(engine)
    prompts = token_prompts(LENGTHS)
    llm.engine.reset_prefix_cache()
    batched = llm.generate(prompts, GREEDY, use_tqdm=False)
    singles = []
    for prompt in prompts:
        llm.engine.reset_prefix_cache()  # no help from the batched run's cached blocks
        singles.extend(llm.generate([prompt], GREEDY, use_tqdm=False))
    for b, s in zip(batched, singles, strict=True):
        assert b.prompt_token_ids == s.prompt_token_ids
        assert b.outputs[0].token_ids == s.outputs[0].token_ids
        assert b.outputs[0].finish_reason == "length"
        for lb, ls in zip(b.outputs[0].logprobs, s.outputs[0].logprobs, strict=True):
            assert lb.keys() == ls.keys()
            for token_id, logprob in lb.items():
                assert logprob.logprob == pytest.approx(ls[token_id].logprob, abs=1e-4)
