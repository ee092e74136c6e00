"""Speculative decoding on the tiny V3.2 and V3 models (fp32): exact greedy verification with the MTP drafter and
with oracle proposers, chunked prefill, prefix caching, preemption, sampling parameters, counters."""

from __future__ import annotations

import contextlib

import pytest
import torch

from dsv32 import SamplingParams
from dsv32.config import tiny_config
from dsv32.engine.sampling_params import StructuredOutputsParams
from dsv32.engine.spec_decode import MTPProposer, OracleProposer

from .conftest import make_engine, token_prompts

VOCAB = tiny_config().vocab_size
V3_CONFIG = tiny_config().with_overrides(architecture="DeepseekV3ForCausalLM", index_topk=0)
GREEDY = SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True)


def base_engine(arch: str):
    return make_engine(arch) if arch == "v32" else make_engine("v3", model_config=V3_CONFIG)


def spec_engine(arch: str, k: int, tight: bool = False):
    kwargs = {"speculative_config": {"method": "mtp", "num_speculative_tokens": k}}
    if arch == "v3":
        kwargs["model_config"] = V3_CONFIG
    if tight:  # 7 blocks of 64 tokens: four growing sequences need more, so some are preempted
        bytes_per_token = base_engine(arch).engine.runner.plan.bytes_per_token * 5 // 4  # + the MTP layer
        kwargs.update(kv_cache_memory=7 * 64 * bytes_per_token, max_model_len=256)
    engine = make_engine(f"{arch}-spec{k}{'-tight' if tight else ''}", **kwargs)
    engine.engine.runner.proposer = MTPProposer(k)  # a test may have put an oracle there
    return engine


@contextlib.contextmanager
def prefix_caching(llm, enabled: bool):
    kv = llm.engine.block_manager
    saved, kv.enable_prefix_caching = kv.enable_prefix_caching, enabled
    kv.reset_prefix_cache()
    try:
        yield
    finally:
        kv.enable_prefix_caching = saved


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def spec_counts(llm) -> tuple[int, int, int, list[int]]:
    s = llm.engine.stats().spec_decode
    return s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens, list(s.accepted_per_pos)


# Prompts longer than the 64-token budget are prefilled in chunks next to other sequences' verify steps. With prefix
# caching, the 130-token prompt is cached first: its repeat keeps the whole hit, and a prompt that diverges right
# after its first block drops that block (its last MTP entry was computed from the other prompt's next token).
MATRIX_PROMPTS = token_prompts([5, 70, 130], seed=1)
MATRIX_PROMPTS.append({"prompt_token_ids": MATRIX_PROMPTS[2]["prompt_token_ids"][:64] + [11] * 30})
_expected: dict[str, list[list[int]]] = {}


@pytest.mark.parametrize("arch", ["v32", "v3"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_output_is_identical_with_speculation_with_and_without_prefix_caching(arch, k):
    if arch not in _expected:
        _expected[arch] = token_ids(base_engine(arch).generate(MATRIX_PROMPTS, GREEDY, use_tqdm=False))
    expected = _expected[arch]
    spec = spec_engine(arch, k)
    with prefix_caching(spec, False):
        assert token_ids(spec.generate(MATRIX_PROMPTS, GREEDY, use_tqdm=False)) == expected
    with prefix_caching(spec, True):
        spec.generate(MATRIX_PROMPTS[2:3], GREEDY, use_tqdm=False)
        again = spec.generate(MATRIX_PROMPTS, GREEDY, use_tqdm=False)
    assert token_ids(again) == expected
    assert [o.num_cached_tokens for o in again] == [0, 0, 128, 0]


def run_counting_steps(llm, prompts, params) -> tuple[list[list[int]], int]:
    """Generate through the engine core directly, counting steps."""
    core = llm.engine
    ids = [f"steps-{i}" for i in range(len(prompts))]
    for request_id, prompt in zip(ids, prompts, strict=True):
        core.add_request(request_id, prompt["prompt_token_ids"], params, stream=False)
    finished, steps = {}, 0
    while core.has_unfinished_requests():
        steps += 1
        finished.update((out.request_id, out) for out in core.step())
    return [finished[i].outputs[0].token_ids for i in ids], steps


@pytest.mark.parametrize("arch", ["v32", "v3"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_oracle_proposer_accepts_everything_and_a_wrong_one_nothing(arch, k):
    rounds = 3
    params = SamplingParams(temperature=0.0, max_tokens=1 + rounds * (k + 1), ignore_eos=True)
    prompts = token_prompts([9, 40], seed=10 + k)
    base, spec = base_engine(arch), spec_engine(arch, k)
    expected, plain_steps = run_counting_steps(base, prompts, params)
    continuations = {tuple(p["prompt_token_ids"]): out for p, out in zip(prompts, expected, strict=True)}

    spec.engine.runner.proposer = OracleProposer(k, continuations, VOCAB)
    before = spec_counts(spec)
    got, spec_steps = run_counting_steps(spec, prompts, params)
    after = spec_counts(spec)
    assert got == expected
    # One prefill step, then every step accepts all k drafts and adds one: (k + 1)x fewer decode steps.
    assert plain_steps - 1 == (k + 1) * (spec_steps - 1) == rounds * (k + 1)
    drafts, draft_tokens, accepted = (a - b for a, b in zip(after[:3], before[:3], strict=True))
    assert (drafts, draft_tokens, accepted) == (2 * rounds, 2 * rounds * k, 2 * rounds * k)
    assert 1 + accepted / drafts == k + 1
    per_pos_before = before[3] + [0] * (len(after[3]) - len(before[3]))
    assert [a - b for a, b in zip(after[3], per_pos_before, strict=True)][:k] == [2 * rounds] * k

    spec.engine.runner.proposer = OracleProposer(k, continuations, VOCAB, wrong=True)
    before = spec_counts(spec)
    got, wrong_steps = run_counting_steps(spec, prompts, params)
    after = spec_counts(spec)
    assert got == expected and wrong_steps == plain_steps
    assert after[2] == before[2]  # nothing accepted
    assert after[1] - before[1] > 0


@pytest.mark.parametrize(("arch", "k"), [("v32", 1), ("v32", 3), ("v3", 2)])
def test_preemption_under_speculation_keeps_greedy_output(arch, k):
    prompts = token_prompts([60, 58, 61, 59], seed=20 + k)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    expected = token_ids(base_engine(arch).generate(prompts, params, use_tqdm=False))
    tight = spec_engine(arch, k, tight=True)
    preemptions = tight.engine.stats().num_preemptions
    assert token_ids(tight.generate(prompts, params, use_tqdm=False)) == expected
    assert tight.engine.stats().num_preemptions > preemptions
    if k < 3:
        return
    # And with oracle drafts, which are accepted, so steps verify k + 1 tokens while the cache is tight.
    continuations = {tuple(p["prompt_token_ids"]): out for p, out in zip(prompts, expected, strict=True)}
    tight.engine.runner.proposer = OracleProposer(k, continuations, VOCAB)
    tight.engine.block_manager.reset_prefix_cache()
    assert token_ids(tight.generate(prompts, params, use_tqdm=False)) == expected


def mtp_cache_rows(llm, prompt: list[int]) -> torch.Tensor:
    """The MTP layer's cache rows of every prompt position, once the prompt is computed and a token sampled."""
    core = llm.engine
    core.add_request("mtp-rows", prompt, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    seq = next(s for s in core.scheduler.waiting if s.request_id == "mtp-rows")
    while seq.num_output_tokens == 0:
        core.step()
    bs = core.block_manager.block_size
    slots = torch.tensor([seq.block_ids[p // bs] * bs + p % bs for p in range(len(prompt))])
    rows = core.runner.kv_cache.latent[core.model_config.num_hidden_layers][slots].clone()
    core.abort_request("mtp-rows")
    return rows


def test_mtp_cache_of_a_prefix_hit_equals_a_cold_computation():
    """The drafter's entries for a cached prefix are the ones it would compute itself, also for a prompt that
    diverges right after a cached block (that block's last entry depends on the next token: it is recomputed)."""
    spec = spec_engine("v32", 2)
    prompt = token_prompts([140], seed=30)[0]["prompt_token_ids"]
    diverging = prompt[:128] + [12] * 5
    with prefix_caching(spec, False):
        cold = [mtp_cache_rows(spec, p) for p in (prompt, diverging)]
    with prefix_caching(spec, True):
        spec.generate([{"prompt_token_ids": prompt}], GREEDY, use_tqdm=False)
        hits_before = spec.engine.stats().prefix_cache_hits
        warm = [mtp_cache_rows(spec, p) for p in (prompt, diverging)]
        assert spec.engine.stats().prefix_cache_hits - hits_before == 128 + 64
    for c, w in zip(cold, warm, strict=True):
        torch.testing.assert_close(w, c, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("k", [1, 3])
def test_sampling_parameters_keep_working_under_accepted_drafts(k):
    """Penalties, logit_bias, min_tokens, stop token ids and strings, and logprobs see exactly the tokens accepted
    before each position: with oracle drafts (all accepted) the output equals the plain engine's."""
    base, spec = base_engine("v32"), spec_engine("v32", k)
    prompts = token_prompts([12, 30, 20, 8], seed=40)
    plain = [
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, repetition_penalty=1.3,
                       frequency_penalty=0.5, presence_penalty=0.3, logprobs=2),
        SamplingParams(temperature=0.0, max_tokens=12, min_tokens=6, logit_bias={500: 3.0, 501: 2.0}),
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=0),
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
    ]
    reference = token_ids(base.generate(prompts, plain, use_tqdm=False))
    # Stops that cut inside an accepted run: a stop token id and a stop string from the middle of the output.
    stop_text = base.engine.tokenizer.decode(reference[3][5:7])
    params = plain[:2] + [
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=0, stop_token_ids=[reference[2][4]]),
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop=[stop_text]),
    ]
    expected = base.generate(prompts, params, use_tqdm=False)
    continuations = {tuple(p["prompt_token_ids"]): out for p, out in zip(prompts, reference, strict=True)}
    spec.engine.runner.proposer = OracleProposer(k, continuations, VOCAB)
    accepted_before = spec_counts(spec)[2]
    got = spec.generate(prompts, params, use_tqdm=False)
    assert spec_counts(spec)[2] > accepted_before
    for e, g in zip(expected, got, strict=True):
        assert g.outputs[0].token_ids == e.outputs[0].token_ids
        assert g.outputs[0].text == e.outputs[0].text
        assert g.outputs[0].finish_reason == e.outputs[0].finish_reason
        assert g.outputs[0].stop_reason == e.outputs[0].stop_reason
    assert got[2].outputs[0].finish_reason == "stop" and len(got[2].outputs[0].token_ids) <= 5
    for e, g in ((expected[0], got[0]), (expected[2], got[2])):
        for pe, pg in zip(e.outputs[0].logprobs, g.outputs[0].logprobs, strict=True):
            assert pe.keys() == pg.keys()
            for token_id, lp in pe.items():
                assert pg[token_id].logprob == pytest.approx(lp.logprob, abs=1e-4)


def test_seeded_sampling_under_speculation_is_reproducible():
    spec = spec_engine("v32", 2)
    prompts = token_prompts([15, 25], seed=50)
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, min_p=0.01, seed=7, max_tokens=6,
                            ignore_eos=True)
    first = token_ids(spec.generate(prompts, params, use_tqdm=False))
    others = token_prompts([33], seed=51)
    second = token_ids(spec.generate(others + prompts, [SamplingParams(max_tokens=2)] + [params] * 2,
                                     use_tqdm=False))[1:]
    assert first == second and all(len(t) == 6 for t in first)


def test_checkpoint_without_mtp_layer_is_a_clear_error():
    with pytest.raises(ValueError, match="num_nextn_predict_layers"):
        make_engine("no-mtp", model_config=tiny_config().with_overrides(num_nextn_predict_layers=0),
                    speculative_config={"num_speculative_tokens": 1})


def test_structured_outputs_are_followed_under_speculation():
    spec = spec_engine("v32", 2)
    choices = ["yes", "no", "it depends"]
    params = [SamplingParams(max_tokens=16, seed=s, structured_outputs=StructuredOutputsParams(choice=choices))
              for s in range(2)] + [SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)]
    drafts_before = spec_counts(spec)[0]
    outs = spec.generate(token_prompts([8, 9, 10], seed=60), params, use_tqdm=False)
    assert [o.outputs[0].text in choices for o in outs[:2]] == [True, True]
    assert len(outs[2].outputs[0].token_ids) == 6
    assert spec_counts(spec)[0] > drafts_before  # the unconstrained request was still drafted for
