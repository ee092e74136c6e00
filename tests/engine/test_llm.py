"""The offline API on the tiny model: prefix cache, preemption, seeds, stop strings, logprobs, n > 1, fp8 KV."""

import pytest

from dsv32 import SamplingParams

from .conftest import make_engine, token_prompts


def assert_logprobs_close(a, b, tol=1e-4):
    assert len(a) == len(b)
    for pa, pb in zip(a, b, strict=True):
        if pa is None:
            assert pb is None
            continue
        assert pa.keys() == pb.keys()
        for token_id, lp in pa.items():
            assert lp.logprob == pytest.approx(pb[token_id].logprob, abs=tol)
            assert lp.rank == pb[token_id].rank


def test_prefix_cache_hit_gives_same_tokens_and_logprobs(v32):
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=2)
    prompt = token_prompts([150], seed=3)
    v32.engine.reset_prefix_cache()
    cold = v32.generate(prompt, params, use_tqdm=False)[0]
    hits_before = v32.engine.stats().prefix_cache_hits
    warm = v32.generate(prompt, params, use_tqdm=False)[0]
    assert cold.num_cached_tokens == 0
    assert warm.num_cached_tokens == 128  # two full 64-token blocks; the last prompt token is always computed
    assert v32.engine.stats().prefix_cache_hits - hits_before == 128
    assert warm.outputs[0].token_ids == cold.outputs[0].token_ids
    assert_logprobs_close(warm.outputs[0].logprobs, cold.outputs[0].logprobs)
    # A prompt that shares only the first block hits one block.
    other = {"prompt_token_ids": prompt[0]["prompt_token_ids"][:64] + [7] * 40}
    assert v32.generate([other], params, use_tqdm=False)[0].num_cached_tokens == 64


def test_forced_preemption_completes_every_request_correctly(v32):
    # 6 blocks of 64 tokens; four sequences that each grow past 64 tokens need 8: some must be preempted.
    tight = make_engine("v32-tight", kv_cache_memory=6 * 64 * v32.engine.runner.plan.bytes_per_token,
                        max_model_len=256)
    assert tight.engine.block_manager.num_blocks == 6
    prompts = token_prompts([60, 58, 61, 59], seed=4)
    params = [SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=0,
                             prompt_logprobs=0 if i == 0 else None) for i in range(4)]
    v32.engine.reset_prefix_cache()
    expected = v32.generate(prompts, params, use_tqdm=False)
    got = tight.generate(prompts, params, use_tqdm=False)
    assert tight.engine.stats().num_preemptions > 0
    for e, g in zip(expected, got, strict=True):
        assert g.outputs[0].token_ids == e.outputs[0].token_ids
        assert g.outputs[0].finish_reason == "length"
        assert_logprobs_close(g.outputs[0].logprobs, e.outputs[0].logprobs, tol=1e-3)
    # Prompt logprobs are reported once per prompt token even when the prompt was recomputed.
    assert len(got[0].prompt_logprobs) == 60
    assert_logprobs_close(got[0].prompt_logprobs, expected[0].prompt_logprobs, tol=1e-3)


def test_seeds_reproduce_whatever_the_batch(v32):
    prompt = token_prompts([20], seed=5)
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=6, ignore_eos=True)
    alone = v32.generate(prompt, seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = token_prompts([9, 30], seed=6)
    batch = v32.generate(others + prompt, [SamplingParams(temperature=1.0, max_tokens=3)] * 2 + [seeded],
                         use_tqdm=False)
    assert batch[2].outputs[0].token_ids == alone
    reseeded = SamplingParams(temperature=1.0, seed=4321, max_tokens=6, ignore_eos=True)
    assert v32.generate(prompt, reseeded, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_n_completions_share_the_prompt_and_reproduce(v32):
    prompt = token_prompts([140], seed=7)
    params = SamplingParams(n=3, temperature=1.0, seed=99, max_tokens=4, ignore_eos=True)
    v32.engine.reset_prefix_cache()
    hits_before = v32.engine.stats().prefix_cache_hits
    first = v32.generate(prompt, params, use_tqdm=False)[0]
    # Siblings wait for the first completion's prefill, then take its two full prompt blocks from the cache.
    assert v32.engine.stats().prefix_cache_hits - hits_before == 2 * 128
    assert [o.index for o in first.outputs] == [0, 1, 2]
    streams = [tuple(o.token_ids) for o in first.outputs]
    assert len(set(streams)) == 3  # seed + index: siblings differ
    again = v32.generate(prompt, params, use_tqdm=False)[0]
    assert [tuple(o.token_ids) for o in again.outputs] == streams
    # Completion 1 of a seed-99 request is what a single seed-100 request gives.
    single = SamplingParams(temperature=1.0, seed=100, max_tokens=4, ignore_eos=True)
    assert tuple(v32.generate(prompt, single, use_tqdm=False)[0].outputs[0].token_ids) == streams[1]


def test_stop_string_across_token_boundary(v32):
    prompt = token_prompts([12], seed=8)
    tokenizer = v32.get_tokenizer()
    free = v32.generate(prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    # Find a token boundary with at least two characters on each side, and a stop string straddling it.
    ids = free.token_ids
    for k in range(1, len(ids) - 1):
        head, tail = tokenizer.decode(ids[:k]), tokenizer.decode(ids[:k + 1])
        if free.text.startswith(tail) and len(head) >= 2 and len(tail) - len(head) >= 2 and "\ufffd" not in tail:
            break
    else:
        pytest.fail(f"no clean token boundary in {free.text!r}")
    stop = tail[len(head) - 2:len(head) + 2]
    expected_text = free.text[:free.text.find(stop)]
    out = v32.generate(prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == expected_text
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert len(out.token_ids) < len(ids)
    shown = v32.generate(prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop=[stop],
                                                include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert shown.text == expected_text + stop


def test_stop_strings_wait_for_min_tokens(v32):
    """As vLLM: a stop string completed within the first ``min_tokens`` tokens does not end the output."""
    prompt = token_prompts([12], seed=8)
    free = v32.generate(prompt, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    tokenizer = v32.get_tokenizer()
    first = tokenizer.decode(free.token_ids[:1])
    assert first and free.text.startswith(first)
    stop = first[:1]  # completed by the very first token
    early = v32.generate(prompt, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, stop=[stop]),
                         use_tqdm=False)[0].outputs[0]
    assert early.finish_reason == "stop" and len(early.token_ids) == 1
    later = v32.generate(prompt, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, stop=[stop],
                                                min_tokens=4), use_tqdm=False)[0].outputs[0]
    assert len(later.token_ids) > 4 and later.token_ids[:5] == free.token_ids[:5]
    assert later.text.startswith(tokenizer.decode(free.token_ids[:4]))


def test_stop_token_ids_and_max_tokens(v32):
    prompt = token_prompts([10], seed=9)
    free = v32.generate(prompt, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    stop_id = free.token_ids[3]
    out = v32.generate(prompt, SamplingParams(temperature=0.0, max_tokens=6, stop_token_ids=[stop_id]),
                       use_tqdm=False)[0].outputs[0]
    first = free.token_ids.index(stop_id)
    assert out.token_ids == free.token_ids[:first + 1]  # the stop token is in token_ids, not in the text
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    assert out.text == v32.get_tokenizer().decode(free.token_ids[:first])
    assert free.finish_reason == "length" and len(free.token_ids) == 6


def test_prompt_logprobs_across_chunks_match_generation_logprobs(v32):
    prompt = token_prompts([100], seed=10)[0]["prompt_token_ids"]
    gen = v32.generate([{"prompt_token_ids": prompt}],
                       SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, logprobs=1),
                       use_tqdm=False)[0].outputs[0]
    extended = prompt + gen.token_ids
    out = v32.generate([{"prompt_token_ids": extended}],
                       SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1), use_tqdm=False)[0]
    assert out.num_cached_tokens == 0  # prompt logprobs need every position computed
    assert len(out.prompt_logprobs) == len(extended) and out.prompt_logprobs[0] is None
    for position, token_id in enumerate(extended[1:], start=1):
        assert token_id in out.prompt_logprobs[position]
    # The 103-token prompt was computed in 64-token chunks; its last positions are the generated tokens.
    assert_logprobs_close(out.prompt_logprobs[len(prompt):], gen.logprobs, tol=1e-4)
    best = max(out.prompt_logprobs[1].values(), key=lambda lp: lp.logprob)
    assert best.rank == 1 and best.decoded_token is not None


def test_fp8_kv_cache_within_tolerance_of_auto(v32):
    """Stated tolerance: the fp8 (656-byte FlashMLA layout + fp8 indexer keys) cache changes prompt logprobs by
    < 0.1 nats each (< 0.03 on average) against the float32 cache, and keeps the greedy first token."""
    fp8 = make_engine("v32-fp8", kv_cache_dtype="fp8")
    prompts = token_prompts([40, 150], seed=11)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, prompt_logprobs=0)
    v32.engine.reset_prefix_cache()
    ref = v32.generate(prompts, params, use_tqdm=False)
    got = fp8.generate(prompts, params, use_tqdm=False)
    for r, g in zip(ref, got, strict=True):
        diffs = []
        for position, token_id in enumerate(r.prompt_token_ids[1:], start=1):
            diffs.append(abs(r.prompt_logprobs[position][token_id].logprob
                             - g.prompt_logprobs[position][token_id].logprob))
        assert max(diffs) < 0.1
        assert sum(diffs) / len(diffs) < 0.03
        assert g.outputs[0].token_ids[0] == r.outputs[0].token_ids[0]


def test_too_long_prompt_is_rejected_with_vllm_wording(v32):
    too_long = token_prompts([600], seed=12)
    with pytest.raises(ValueError, match="maximum context length is 512 tokens"):
        v32.generate(too_long, SamplingParams(max_tokens=4), use_tqdm=False)
    with pytest.raises(ValueError, match="you requested 1010 tokens \\(10 in the messages, 1000 in the completion\\)"):
        v32.validator.validate(token_prompts([10])[0]["prompt_token_ids"], SamplingParams(max_tokens=1000))
    # Offline, an oversized max_tokens is capped at max_model_len instead.
    out = v32.generate(token_prompts([500], seed=13), SamplingParams(max_tokens=1000, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 12 and out.outputs[0].finish_reason == "length"


def test_string_prompts_and_chat(v32):
    out = v32.generate("Hello, my name is", SamplingParams(temperature=0.0, max_tokens=3), use_tqdm=False)[0]
    tokenizer = v32.get_tokenizer()
    assert out.prompt == "Hello, my name is"
    assert out.prompt_token_ids == tokenizer.encode("Hello, my name is", add_special_tokens=True)
    chat = v32.chat([{"role": "user", "content": "Hi!"}], SamplingParams(temperature=0.0, max_tokens=3),
                    use_tqdm=False)[0]
    assert chat.prompt.startswith(tokenizer.bos_token) and chat.prompt.endswith("</think>")
    assert chat.prompt_token_ids == tokenizer.encode(chat.prompt)
    assert len(chat.outputs[0].token_ids) <= 3
