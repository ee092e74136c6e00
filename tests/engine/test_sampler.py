"""The batched sampler: each parameter's effect on hand-made logits, seeds, logprobs and prompt logprobs."""

from __future__ import annotations

import pytest
import torch

from dsv32.engine import sampler as sampler_module
from dsv32.engine.outputs import Logprob
from dsv32.engine.sampler import (
    Sampler,
    SamplingRequestState,
    TokenLogprobs,
    make_generator,
    reads_output_tokens,
    token_logprobs,
)
from dsv32.engine.sampling_params import SamplingParams

EOS = 1


def row(params: SamplingParams | None = None, prompt: list[int] | None = None, output: list[int] | None = None,
        generator: torch.Generator | None = None) -> SamplingRequestState:
    return SamplingRequestState(params or SamplingParams(), prompt or [], output or [], generator)


def sample_many(logits_row: list[float], params: SamplingParams, count: int = 4000, seed: int = 0) -> torch.Tensor:
    """``count`` independent draws for the same logits row: one batch of identical rows."""
    logits = torch.tensor([logits_row]).repeat(count, 1)
    return Sampler(seed=seed)(logits, [row(params)] * count, EOS).token_ids


@pytest.mark.parametrize("vocab", [129280, 4096 * 5, 1000, 997])
def test_blockwise_argmax_is_the_first_maximum(vocab: int) -> None:
    """The sampler's argmax finds ``Tensor.argmax``'s index: the first maximum, ties across and within blocks,
    NaN counting as the largest, a row of -inf; rows it cannot cut into blocks (a prime vocab, a strided view) too."""
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(vocab))
    logits[1, [3, vocab // 2, vocab - 1]] = 50.0  # the same maximum in several blocks: the first wins
    logits[2, [vocab - 2, vocab - 1]] = 50.0  # a tie in the last block
    logits[3, [vocab // 3, vocab - 5]] = float("nan")
    logits[4] = float("-inf")
    logits[5, vocab - 1] = float("inf")
    expected = logits.argmax(dim=-1)
    assert sampler_module.argmax(logits).tolist() == expected.tolist()
    assert [sampler_module.argmax(logits[i:i + 1]).tolist() for i in range(6)] == [[i] for i in expected.tolist()]
    assert sampler_module.argmax(torch.cat([logits, logits], dim=1)[:, :vocab]).tolist() == expected.tolist()
    if vocab == 129280:
        assert sampler_module._argmax_block(vocab) == 1010  # blocks are used for the real vocabulary


def test_greedy_is_argmax_and_draws_no_randomness() -> None:
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    generator = make_generator(3)
    state_before = generator.get_state()
    rows = [row(SamplingParams(temperature=0.0), generator=generator)] + [row(SamplingParams(temperature=0.0))] * 4
    out = Sampler(seed=0)(logits, rows, EOS)
    assert out.token_ids.tolist() == logits.argmax(dim=-1).tolist()
    assert torch.equal(generator.get_state(), state_before)
    assert out.logprobs == [None] * 5


def test_greedy_rows_do_not_shift_the_shared_random_stream() -> None:
    logits = torch.randn(3, 200, generator=torch.Generator().manual_seed(1))
    hot = SamplingParams(temperature=1.0)
    alone = Sampler(seed=5)(logits[2:], [row(hot)], EOS).token_ids
    mixed = Sampler(seed=5)(logits, [row(SamplingParams(temperature=0.0))] * 2 + [row(hot)], EOS).token_ids
    assert mixed[2] == alone[0]


def test_sampling_follows_softmax_of_logits_over_temperature() -> None:
    logits_row = [1.0, 0.0, -1.0, 0.5]
    draws = sample_many(logits_row, SamplingParams(temperature=2.0), count=20000)
    frequencies = torch.bincount(draws, minlength=4).float() / len(draws)
    expected = torch.softmax(torch.tensor(logits_row) / 2.0, dim=-1)
    assert torch.allclose(frequencies, expected, atol=0.02)


def test_top_k_never_samples_outside_the_k_best() -> None:
    logits_row = [0.0, 3.0, 1.0, 2.9, -1.0, 0.5]
    draws = sample_many(logits_row, SamplingParams(temperature=5.0, top_k=2))
    assert set(draws.tolist()) == {1, 3}


def test_top_k_rows_and_unrestricted_rows_in_one_batch() -> None:
    logits = torch.linspace(0.0, 0.7, 8).repeat(400, 1)  # near-uniform at temperature 10; tokens 6, 7 best
    rows = [row(SamplingParams(temperature=10.0, top_k=2 if i % 2 else 0)) for i in range(400)]
    draws = Sampler(seed=0)(logits, rows, EOS).token_ids
    assert set(draws[1::2].tolist()) == {6, 7}
    assert set(draws[0::2].tolist()) == set(range(8))


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    logits_row = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().tolist()
    assert set(sample_many(logits_row, SamplingParams(top_p=0.45)).tolist()) == {0}
    assert set(sample_many(logits_row, SamplingParams(top_p=0.55)).tolist()) == {0, 1}
    assert set(sample_many(logits_row, SamplingParams(top_p=0.79)).tolist()) == {0, 1}
    assert set(sample_many(logits_row, SamplingParams(top_p=0.81)).tolist()) == {0, 1, 2}
    assert set(sample_many(logits_row, SamplingParams(top_p=0.96)).tolist()) == {0, 1, 2, 3}


def test_top_p_beyond_the_candidate_shortcut(monkeypatch: pytest.MonkeyPatch) -> None:
    # With only 2 candidates looked at first, a flat row needs the full sort; a peaked row does not.
    monkeypatch.setattr(sampler_module, "TOP_P_CANDIDATES", 2)
    flat = torch.tensor([0.2, 0.19, 0.18, 0.16, 0.14, 0.13]).log().tolist()
    peaked = torch.tensor([0.6, 0.3, 0.04, 0.03, 0.02, 0.01]).log().tolist()
    logits = torch.tensor([flat, peaked]).repeat(1000, 1)
    params = SamplingParams(top_p=0.75)
    draws = Sampler(seed=0)(logits, [row(params)] * 2000, EOS).token_ids
    assert set(draws[0::2].tolist()) == {0, 1, 2, 3, 4}  # the mass above the 6th token is 0.87 >= 0.75
    assert set(draws[1::2].tolist()) == {0, 1}


def test_min_p_drops_tokens_below_a_fraction_of_the_best() -> None:
    logits_row = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().tolist()
    assert set(sample_many(logits_row, SamplingParams(min_p=0.5)).tolist()) == {0, 1}
    assert set(sample_many(logits_row, SamplingParams(min_p=0.2)).tolist()) == {0, 1, 2}


def test_penalties_change_the_right_logits_by_the_right_amounts() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, 3.0]])
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    processed = Sampler().processed_logits(logits, [row(params, prompt=[0], output=[1, 2, 2])], EOS)
    # 0: prompt only, positive -> /2.  1: once in output, negative -> *2 - 0.5 - 0.25.  2: twice -> /2 - 1 - 0.25.
    assert processed.tolist() == [[1.0, -4.75, -0.75, 0.5, 3.0]]
    assert logits.tolist() == [[2.0, -2.0, 1.0, 0.5, 3.0]]  # the caller's logits are not modified


def test_frequency_and_presence_ignore_prompt_tokens() -> None:
    logits = torch.zeros(1, 4)
    params = SamplingParams(frequency_penalty=1.0, presence_penalty=1.0)
    processed = Sampler().processed_logits(logits, [row(params, prompt=[0, 0, 3], output=[2])], EOS)
    assert processed.tolist() == [[0.0, 0.0, -2.0, 0.0]]


def test_only_penalized_rows_change() -> None:
    logits = torch.ones(3, 4)
    rows = [row(SamplingParams(), output=[0]), row(SamplingParams(presence_penalty=1.0), output=[0]),
            row(SamplingParams(), output=[0])]
    processed = Sampler().processed_logits(logits, rows, EOS)
    assert processed.tolist() == [[1.0] * 4, [0.0, 1.0, 1.0, 1.0], [1.0] * 4]


def test_logit_bias_is_added() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]] * 2)
    rows = [row(SamplingParams(temperature=0.0, logit_bias={0: 5.0})),
            row(SamplingParams(temperature=0.0, logit_bias={3: -100.0, 1: 0.5}))]
    assert Sampler().processed_logits(logits, rows, EOS).tolist() == [[5.0, 1.0, 2.0, 3.0], [0.0, 1.5, 2.0, -97.0]]
    assert Sampler()(logits, rows, EOS).token_ids.tolist() == [0, 2]


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_min_tokens_masks_eos_and_stop_ids_until_reached(ignore_eos: bool) -> None:
    logits = torch.tensor([[0.0, 9.0, 0.0, 8.0, 1.0]] * 3)  # EOS (1) best, then stop id 3
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[3], ignore_eos=ignore_eos)
    rows = [row(params, output=[]), row(params, output=[4]), row(params, output=[4, 4])]
    assert Sampler()(logits, rows, EOS).token_ids.tolist() == [4, 4, EOS]


def test_seeded_request_is_reproducible_whatever_the_batch() -> None:
    vocab, steps = 1000, 6
    logits_per_step = [torch.randn(vocab, generator=torch.Generator().manual_seed(step)) for step in range(steps)]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=42)

    def run(batch_size: int, position: int, sampler_seed: int) -> list[int]:
        generator = make_generator(seeded.seed)
        others = [row(SamplingParams(temperature=0.8), generator=None if i % 2 else make_generator(i))
                  for i in range(batch_size - 1)]
        tokens = []
        sampler = Sampler(seed=sampler_seed)
        for step_logits in logits_per_step:
            rows = others[:position] + [row(seeded, generator=generator)] + others[position:]
            noise = torch.randn(batch_size, vocab, generator=torch.Generator().manual_seed(sampler_seed))
            logits = noise.index_copy(0, torch.tensor([position]), step_logits.view(1, -1))
            tokens.append(int(sampler(logits, rows, EOS).token_ids[position]))
        return tokens

    reference = run(batch_size=1, position=0, sampler_seed=0)
    assert run(batch_size=5, position=3, sampler_seed=1) == reference
    assert run(batch_size=8, position=0, sampler_seed=2) == reference
    assert len(set(reference)) > 1  # really sampled, not collapsed to one token


def test_sampler_seed_reproduces_unseeded_rows() -> None:
    logits = torch.randn(16, 300, generator=torch.Generator().manual_seed(0))
    rows = [row(SamplingParams(temperature=1.0))] * 16
    assert torch.equal(Sampler(seed=9)(logits, rows, EOS).token_ids, Sampler(seed=9)(logits, rows, EOS).token_ids)


def test_logprobs_are_raw_log_softmax_with_rank_and_top_alternatives() -> None:
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(2))
    rows = [row(SamplingParams(temperature=0.7, repetition_penalty=1.5, logprobs=3), output=[5, 6]),
            row(SamplingParams(temperature=0.0)),
            row(SamplingParams(temperature=1.3, top_k=10, logprobs=0))]
    out = Sampler(seed=0)(logits, rows, EOS)
    raw = torch.log_softmax(logits, dim=-1)
    assert out.logprobs[1] is None
    for i, top_count in ((0, 3), (2, 0)):
        result = out.logprobs[i]
        token = int(out.token_ids[i])
        assert result.token_id == token
        assert result.logprob == pytest.approx(raw[i, token].item(), abs=1e-6)
        assert result.rank == int((raw[i] >= raw[i, token]).sum())
        expected_top = raw[i].topk(top_count) if top_count else None
        assert result.top_token_ids == (expected_top.indices.tolist() if top_count else [])
        assert result.top_logprobs == pytest.approx(expected_top.values.tolist() if top_count else [], abs=1e-6)


def test_position_logprobs_put_the_chosen_token_first_once() -> None:
    chosen_in_top = TokenLogprobs(7, -0.5, 2, [3, 7], [-0.2, -0.5])
    assert chosen_in_top.to_position_logprobs() == {7: Logprob(-0.5, 2), 3: Logprob(-0.2, 1)}
    assert list(TokenLogprobs(9, -4.0, 30, [3, 7], [-0.2, -0.5]).to_position_logprobs()) == [9, 3, 7]


def test_token_logprobs_with_different_top_counts() -> None:
    logits = torch.randn(2, 10, generator=torch.Generator().manual_seed(4))
    results = token_logprobs(logits, torch.tensor([0, 9]), [2, 0])
    assert [len(r.top_token_ids) for r in results] == [2, 0]


def test_bad_inputs_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="one row per request"):
        Sampler()(torch.zeros(2, 5), [row()], EOS)
# 99.9% quantiles of the chi-square distribution by degrees of freedom (a correct sampler fails 1 run in 1000).
CHI2_999 = {3: 16.27, 4: 18.47, 5: 20.52}


def chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic of the draws against ``probs`` over the tokens it allows, and its degrees of freedom."""
    support = probs > 0
    assert support[tokens].all(), "drew a token of probability 0"
    observed = torch.bincount(tokens, minlength=probs.numel()).double()[support]
    expected = probs.double()[support] * tokens.numel()
    return float(((observed - expected) ** 2 / expected).sum()), int(support.sum()) - 1


@pytest.mark.parametrize(("params", "draft"), [
    (SamplingParams(temperature=1.0), 0),  # the most likely token
    (SamplingParams(temperature=1.0), 4),  # an unlikely one
    (SamplingParams(temperature=0.7, top_k=5), 2),
    (SamplingParams(temperature=1.3, top_k=5), 5),  # a draft top-k removed: always rejected
])
def test_rejection_sampling_of_a_draft_keeps_the_target_distribution(params, draft) -> None:
    logits_row = torch.tensor([2.0, 1.5, 1.0, 0.5, -0.5, -1.0])
    count = 40_000
    logits = logits_row.repeat(count, 1)
    out = Sampler(seed=1)(logits, [row(params)] * count, EOS, [draft] * count).token_ids
    target = torch.softmax(logits_row / params.temperature, dim=-1)
    if params.top_k:
        target[target.argsort(descending=True)[params.top_k:]] = 0
        target /= target.sum()
    statistic, dof = chi_square(out, target)
    assert statistic < CHI2_999[dof], (statistic, torch.bincount(out, minlength=6), target * count)
    # A test that can fail: accepting the draft whenever the target's argmax agrees (or always) would not match.
    assert abs(float((out == draft).double().mean()) - float(target[draft])) < 0.01


def test_drafts_are_verified_per_row_and_greedy_rows_take_the_argmax() -> None:
    logits = torch.tensor([[0.0, 5.0, 0.0, 0.0], [0.0, 5.0, 0.0, 0.0], [30.0, 0.0, 0.0, 0.0]])
    rows = [row(SamplingParams(temperature=0.0)), row(SamplingParams(temperature=0.0)),
            row(SamplingParams(temperature=1.0, seed=3), generator=make_generator(3))]
    out = Sampler(seed=0)(logits, rows, EOS, [1, 2, None]).token_ids.tolist()
    assert out == [1, 1, 0]  # greedy: the argmax whatever the draft; a row without a draft samples as usual


def test_seeded_verification_reproduces() -> None:
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(4))
    params = SamplingParams(temperature=1.0, seed=9)

    def run() -> list[int]:
        generator = make_generator(9)
        return [int(Sampler()(logits, [row(params, generator=generator)], EOS, [d]).token_ids) for d in range(20)]

    assert run() == run()


@pytest.mark.parametrize("vocab", [129280, 1000, 7])
def test_two_level_inverse_cdf_matches_the_full_cumulative_sum(vocab: int) -> None:
    """The block-then-token search picks the token the full-vocabulary CDF picks for the same uniform number (up to
    float rounding at block edges), never one with zero probability, and the last token when the uniform is ~1."""
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(64, vocab, generator=gen) ** 8  # mass on few tokens, like a real distribution
    probs[:, ::3] = 0.0  # zero-probability tokens inside blocks
    sampler = Sampler(seed=1)
    got = sampler._inverse_cdf(probs, [row()] * 64)
    uniform = Sampler(seed=1)._uniform([row()] * 64)
    cumulative = probs.double().cumsum(dim=-1)
    expected = torch.searchsorted(cumulative, uniform.double() * cumulative[:, -1:], right=True).view(-1)
    assert (got == expected).float().mean() >= 0.98
    assert (probs.gather(1, got.view(-1, 1)) > 0).all()
    last = int(probs[0].nonzero().max())
    sampler._uniform = lambda rows: torch.ones(len(rows), 1)  # type: ignore[method-assign]
    assert int(sampler._inverse_cdf(probs[:1], [row()])[0]) == last


def test_only_min_tokens_and_penalties_read_the_output_tokens() -> None:
    """The runner passes output tokens only to rows that read them: any other row must sample the same without."""
    assert not reads_output_tokens(SamplingParams(temperature=0.7, top_p=0.9, logprobs=2, logit_bias={3: 1.0}))
    for params in (SamplingParams(min_tokens=2), SamplingParams(repetition_penalty=1.2),
                   SamplingParams(frequency_penalty=0.5), SamplingParams(presence_penalty=-0.5)):
        assert reads_output_tokens(params)
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(8))
    params = SamplingParams(temperature=1.0, seed=2, logit_bias={4: 2.0}, logprobs=3)
    with_outputs = Sampler()(logits, [row(params, [5, 6], [7, 8], make_generator(2))], EOS)
    without = Sampler()(logits, [row(params, [5, 6], [], make_generator(2))], EOS)
    assert with_outputs.token_ids.tolist() == without.token_ids.tolist() and with_outputs.logprobs == without.logprobs
