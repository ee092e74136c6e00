"""Scheduler policy with token counts only (no model): budget, decode-first, chunking, FIFO, preemption, n > 1."""

import itertools
import random

from dsv32.config import tiny_config
from dsv32.engine.block_manager import BlockManager, DataParallelBlockManager
from dsv32.engine.request import TokenSequence
from dsv32.engine.sampling_params import SamplingParams
from dsv32.engine.scheduler import (
    ALONE_MIN_PREFILL_CHUNK,
    DEFAULT_CONTEXT_COST_TOKENS,
    Scheduler,
    SchedulerOutput,
    chunk_cost,
    estimate_context_cost_tokens,
    max_chunk_for_cost,
)

BS = 4


def make_seq(prompt_len: int, max_tokens: int, first_token: int = 0, rid: str = "r") -> TokenSequence:
    return TokenSequence(rid, 0, [first_token + i for i in range(prompt_len)], SamplingParams(), max_tokens=max_tokens)


def fake_step(sched: Scheduler) -> SchedulerOutput:
    """One engine step without a model: each sequence that caught up samples a token (a function of its length)."""
    out = sched.schedule()
    assert out.num_tokens <= sched.max_num_batched_tokens
    assert sched.num_running <= sched.max_num_seqs
    sched.on_step_done(out, {})
    for item in out.scheduled:
        seq = item.seq
        if seq.num_computed_tokens == seq.num_tokens:
            seq.append_token(1000 + seq.num_tokens)
            if seq.num_output_tokens >= seq.max_tokens:
                sched.finish(seq, "length")
    return out


def run_to_completion(sched: Scheduler, max_steps: int = 10_000) -> list[SchedulerOutput]:
    steps = []
    while sched.has_unfinished:
        steps.append(fake_step(sched))
        assert len(steps) < max_steps, "scheduler made no progress"
    return steps


def test_decodes_first_then_chunked_prefill_within_budget():
    manager = BlockManager(64, BS)
    sched = Scheduler(manager, max_num_seqs=8, max_num_batched_tokens=10)
    a = make_seq(3, 5)
    sched.add(a)
    first = fake_step(sched)
    assert [(s.seq, s.num_new_tokens) for s in first.scheduled] == [(a, 3)]
    b = make_seq(25, 2, first_token=50)
    sched.add(b)
    out = fake_step(sched)
    # a's decode goes first; b gets the rest of the budget as its first chunk.
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(a, 1), (b, 9)]
    out = fake_step(sched)
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(a, 1), (b, 9)]
    out = fake_step(sched)
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(a, 1), (b, 7)]
    assert b.num_output_tokens == 1
    run_to_completion(sched)
    assert manager.num_free_blocks == 64


def test_fifo_admission_and_max_num_seqs():
    manager = BlockManager(64, BS)
    sched = Scheduler(manager, max_num_seqs=2, max_num_batched_tokens=100)
    seqs = [make_seq(3, 3, first_token=10 * i) for i in range(4)]
    for s in seqs:
        sched.add(s)
    out = fake_step(sched)
    assert [s.seq for s in out.scheduled] == seqs[:2]
    run_to_completion(sched)
    assert all(s.is_finished and s.num_output_tokens == 3 for s in seqs)
    assert manager.num_free_blocks == 64


def test_preemption_by_recompute_completes_everything():
    # 6 blocks of 4 tokens; each sequence grows to 16 tokens (4 blocks), so two cannot both finish without preemption.
    manager = BlockManager(6, BS)
    sched = Scheduler(manager, max_num_seqs=4, max_num_batched_tokens=64)
    seqs = [make_seq(6, 10, first_token=100 * i) for i in range(3)]
    for s in seqs:
        sched.add(s)
    run_to_completion(sched)
    assert sched.num_preemptions > 0
    for s in seqs:
        assert s.is_finished and s.num_output_tokens == 10
        # Tokens are a function of length only, so recompute must not have changed the stream.
        assert s.output_token_ids == [1000 + n for n in range(6, 16)]
    assert manager.num_free_blocks == 6


def test_preempted_sequence_reuses_its_cached_prefix():
    manager = BlockManager(6, BS)
    sched = Scheduler(manager, max_num_seqs=4, max_num_batched_tokens=64)
    seqs = [make_seq(9, 10, first_token=100 * i) for i in range(3)]
    for s in seqs:
        sched.add(s)
    run_to_completion(sched)
    assert sched.num_preemptions > 0
    assert manager.prefix_cache_hits > 0
    assert all(s.num_cached_tokens == 0 for s in seqs)  # the user-visible hit is the first admission's
    assert manager.num_free_blocks == 6


def test_prefix_hit_on_admission_reports_cached_tokens():
    manager = BlockManager(32, BS)
    sched = Scheduler(manager, max_num_seqs=4, max_num_batched_tokens=64)
    a = make_seq(10, 1)
    sched.add(a)
    run_to_completion(sched)
    b = make_seq(10, 1)
    sched.add(b)
    out = fake_step(sched)
    assert b.num_cached_tokens == 8 and out.scheduled[0].num_new_tokens == 2
    assert manager.prefix_cache_queries == 20 and manager.prefix_cache_hits == 8


def test_prompt_logprobs_bypass_the_prefix_cache():
    manager = BlockManager(32, BS)
    sched = Scheduler(manager, max_num_seqs=4, max_num_batched_tokens=64)
    sched.add(make_seq(10, 1))
    run_to_completion(sched)
    b = make_seq(10, 1)
    b.prompt_logprobs = [None]
    sched.add(b)
    out = fake_step(sched)
    assert b.num_cached_tokens == 0 and out.scheduled[0].num_new_tokens == 10


def test_siblings_wait_for_leader_then_hit_cache():
    manager = BlockManager(32, BS)
    sched = Scheduler(manager, max_num_seqs=8, max_num_batched_tokens=6)
    leader = make_seq(10, 2)
    siblings = [make_seq(10, 2) for _ in range(2)]
    for s in siblings:
        s.prefill_leader = leader
    other = make_seq(3, 2, first_token=500)
    for s in [leader, *siblings, other]:
        sched.add(s)
    out = fake_step(sched)
    assert [s.seq for s in out.scheduled] == [leader]  # budget 6 < 10: leader's first chunk only
    out = fake_step(sched)
    # leader finishes its prompt; siblings are held back, the unrelated request behind them is not.
    assert [s.seq for s in out.scheduled] == [leader, other]
    out = fake_step(sched)
    assert siblings[0] in [s.seq for s in out.scheduled]
    run_to_completion(sched)
    assert all(s.num_cached_tokens == 8 for s in siblings)
    assert manager.num_free_blocks == 32


def test_finish_from_waiting_and_running_frees_blocks():
    manager = BlockManager(16, BS)
    sched = Scheduler(manager, max_num_seqs=1, max_num_batched_tokens=64)
    a, b = make_seq(5, 10), make_seq(5, 10, first_token=9)
    sched.add(a)
    sched.add(b)
    fake_step(sched)
    sched.finish(a, "abort")
    sched.finish(b, "abort")
    assert not sched.has_unfinished and manager.num_free_blocks == 16
    assert a.finish_reason == b.finish_reason == "abort"


def test_with_data_parallel_attention_the_head_of_the_queue_goes_to_a_rank_with_room():
    """A waiting sequence that found no room on the rank it was tried on is placed anew at the next step, instead of
    stalling the queue until that rank frees blocks while the other has them."""
    manager = DataParallelBlockManager(dp_size=2, num_blocks=4, block_size=BS)
    sched = Scheduler(manager, max_num_seqs=8, max_num_batched_tokens=64, context_cost_tokens=None)
    done_soon, long_running, head = make_seq(12, 1), make_seq(8, 8, first_token=20), make_seq(12, 2, first_token=40)
    for seq in (done_soon, long_running, head):
        sched.add(seq)
    # Ranks 0 and 1 take three and two of their four blocks; ``head`` needs three, and finds them on neither.
    first = fake_step(sched)
    assert [item.seq for item in first.scheduled] == [done_soon, long_running]
    assert (done_soon.dp_rank, long_running.dp_rank) == (None, 1) and done_soon.is_finished  # rank 0 is free again
    second = fake_step(sched)
    assert [item.seq for item in second.scheduled] == [long_running, head] and head.dp_rank == 0
    run_to_completion(sched)
    assert manager.num_free_blocks == manager.num_blocks


def test_random_workloads_never_leak_or_stall():
    rng = random.Random(0)
    for trial in range(30):
        num_blocks = rng.randint(8, 24)
        manager = BlockManager(num_blocks, BS, enable_prefix_caching=rng.random() < 0.7)
        sched = Scheduler(manager, max_num_seqs=rng.randint(1, 6), max_num_batched_tokens=rng.randint(1, 40))
        capacity = num_blocks * BS
        seqs = []
        for i in range(rng.randint(1, 10)):
            prompt_len = rng.randint(1, capacity - 1)
            # Shared prefixes (token values from a small range) so the cache gets hits.
            s = make_seq(prompt_len, rng.randint(1, capacity - prompt_len), first_token=rng.choice([0, 0, 7 * i]))
            seqs.append(s)
            sched.add(s)
        run_to_completion(sched)
        assert all(s.is_finished and s.num_output_tokens == s.max_tokens for s in seqs), trial
        assert manager.num_free_blocks == num_blocks, trial


def test_speculative_decode_schedules_drafts_and_lookahead_slots_within_budget_and_max_tokens():
    blocks = BlockManager(num_blocks=32, block_size=BS, enable_prefix_caching=False)
    sched = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=8, num_speculative_tokens=3)
    seq = make_seq(prompt_len=5, max_tokens=6)
    sched.add(seq)
    first = sched.schedule()  # the prompt, plus k - 1 = 2 slots the drafter's chain writes past it
    assert first.scheduled[0].num_new_tokens == 5 and first.scheduled[0].spec_token_ids == []
    assert len(seq.block_ids) * BS >= 5 + 2
    sched.on_step_done(first, {})
    seq.append_token(50)
    seq.spec_token_ids = [51, 52, 53]
    second = sched.schedule()
    assert second.scheduled[0].spec_token_ids == [51, 52, 53] and second.num_tokens == 4
    assert seq.spec_token_ids == []  # handed to the step
    assert len(seq.block_ids) * BS >= 5 + 1 + 3 + 2
    sched.on_step_done(second, {seq: 2})  # two drafts accepted, the third rejected
    assert seq.num_computed_tokens == 5 + 1 + 2
    seq.token_ids.extend([51, 52, 60])
    # Two outputs left (max_tokens 6): at most one draft, since the step adds a token of its own.
    seq.spec_token_ids = [61, 62, 63]
    third = sched.schedule()
    assert third.scheduled[0].spec_token_ids == [61]
    sched.on_step_done(third, {seq: 0})
    sched.finish(seq, "length")
    assert blocks.num_free_blocks == 32


def test_speculative_drafts_are_cut_by_the_token_budget():
    blocks = BlockManager(num_blocks=32, block_size=BS, enable_prefix_caching=False)
    sched = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=3, num_speculative_tokens=4)
    seq = make_seq(prompt_len=2, max_tokens=20)
    sched.add(seq)
    sched.on_step_done(sched.schedule(), {})
    seq.append_token(9)
    seq.spec_token_ids = [1, 2, 3, 4]
    out = sched.schedule()
    assert out.scheduled[0].spec_token_ids == [1, 2] and out.num_tokens == 3
    sched.finish(seq, "abort")


# ---- cost-aware chunking ----------------------------------------------------------------------------------------


def test_chunk_cost_model_and_its_inverse():
    assert chunk_cost(10, 0, None) == 10.0
    assert chunk_cost(10, 90, 100.0) == 10 * (1 + 100 / 100)
    for start in (0, 7, 1000, 65_000):
        for budget in (0.5, 1, 10, 2048, 10_000):
            c = max_chunk_for_cost(start, budget, 320.0)
            assert chunk_cost(c, start, 320.0) <= budget < chunk_cost(c + 1, start, 320.0)
    assert max_chunk_for_cost(5, 0, 320.0) == 0
    assert max_chunk_for_cost(5, 37.9, None) == 37


def test_estimate_context_cost_tokens_tiny_preset_is_near_the_measured_default():
    k = estimate_context_cost_tokens(tiny_config())
    assert 0.5 * DEFAULT_CONTEXT_COST_TOKENS < k < 2 * DEFAULT_CONTEXT_COST_TOKENS


def _long_prompt_schedule(context_cost_tokens, prompt_len=4000, budget=256, num_decoders=2):
    """Two decoding sequences, then a long prompt: every step's chunk of the long prompt, and whether each decoder
    got its token in every step the long prompt was in."""
    manager = BlockManager(4000, BS)
    sched = Scheduler(manager, max_num_seqs=8, max_num_batched_tokens=budget, context_cost_tokens=context_cost_tokens,
                      min_prefill_chunk=4)
    decoders = [make_seq(5, 100_000, first_token=10 * i, rid=f"d{i}") for i in range(num_decoders)]
    for d in decoders:
        sched.add(d)
    fake_step(sched)  # the decoders' prompts
    long = make_seq(prompt_len, 1, first_token=1000, rid="long")
    sched.add(long)
    chunks: list[tuple[int, int]] = []  # (start, size)
    while not long.is_finished:
        start = long.num_computed_tokens
        out = fake_step(sched)
        scheduled = {item.seq: item.num_new_tokens for item in out.scheduled}
        assert all(scheduled.get(d) == 1 for d in decoders), "a decode missed a step"
        if long in scheduled and start < prompt_len:
            chunks.append((start, scheduled[long]))
            cost = chunk_cost(scheduled[long], start, context_cost_tokens)
            assert cost <= budget or scheduled[long] <= 4, "cost budget exceeded beyond the minimum chunk"
        assert len(chunks) < 10_000
    return chunks


def test_prefill_chunks_shrink_with_context_decodes_run_every_step_and_the_prompt_completes():
    chunks = _long_prompt_schedule(context_cost_tokens=100.0)
    assert sum(size for _, size in chunks) == 4000  # the whole prompt, each token once
    assert [start for start, _ in chunks] == [0] + list(itertools.accumulate(size for _, size in chunks[:-1]))
    sizes = [size for _, size in chunks[:-1]]  # the last chunk is whatever was left
    assert sizes == sorted(sizes, reverse=True), "chunks grow with context"
    assert sizes[0] > 4 * sizes[-1]
    # At context p the chunk is about budget * K / p: 256 * 100 / 3000 ~ 8 tokens.
    late = [size for start, size in chunks if 3000 <= start < 3900]
    assert late and max(late) <= 10
    # The token budget alone (the old policy) gives full-budget chunks throughout.
    fixed = _long_prompt_schedule(context_cost_tokens=None)
    assert {size for _, size in fixed[:-1]} == {256 - 2}


def test_minimum_chunk_keeps_a_very_long_prompt_progressing():
    chunks = _long_prompt_schedule(context_cost_tokens=1.0, prompt_len=600)
    assert sum(size for _, size in chunks) == 600
    # Past context ~60 the cost budget pays for fewer than 4 tokens (4 * (1 + 64) > 256): the floor applies.
    late = [size for start, size in chunks[:-1] if start >= 60]
    assert late and set(late) == {4}


def test_short_contexts_keep_nearly_full_token_budget_chunks():
    """With K >> the token budget, short contexts cost about their token count: chunks stay near the budget."""
    manager = BlockManager(64, BS)
    sched = Scheduler(manager, max_num_seqs=1, max_num_batched_tokens=32, context_cost_tokens=10_000.0)
    seq = make_seq(100, 1)
    sched.add(seq)
    sched.add(make_seq(10, 1, first_token=5000, rid="queued"))  # waits (max_num_seqs 1): seq is not alone
    assert [item.num_new_tokens for item in fake_step(sched).scheduled] == [31]  # 32 * (1 + 32 / 1e4) > 32


def test_a_prompt_alone_in_the_engine_keeps_large_chunks_until_another_arrives():
    """Nothing else running or waiting: the cost budget protects nobody, so a long prompt's chunks do not shrink below
    ``ALONE_MIN_PREFILL_CHUNK`` (small chunks at long context cost more in all); once another sequence arrives they
    shrink again."""
    manager = BlockManager(4000, BS)
    sched = Scheduler(manager, max_num_seqs=8, max_num_batched_tokens=1024, context_cost_tokens=100.0,
                      min_prefill_chunk=4)
    long = make_seq(3000, 1, first_token=1000, rid="long")
    sched.add(long)
    sizes = [fake_step(sched).scheduled[0].num_new_tokens for _ in range(4)]
    assert sizes == [ALONE_MIN_PREFILL_CHUNK] * 4  # the cost budget alone: 1024 * 100 / 1500 ~ 70 at context 1500
    sched.add(make_seq(5, 100, first_token=10, rid="other"))
    out = fake_step(sched)
    chunk = {item.seq.request_id: item.num_new_tokens for item in out.scheduled}
    assert chunk["long"] == max_chunk_for_cost(2048, 1024.0, 100.0) < ALONE_MIN_PREFILL_CHUNK  # the cost budget again


def test_prefill_chunks_of_one_step_share_the_cost_budget():
    manager = BlockManager(1000, BS)
    sched = Scheduler(manager, max_num_seqs=8, max_num_batched_tokens=300, context_cost_tokens=50.0,
                      min_prefill_chunk=1)
    a, b = make_seq(1000, 1, rid="a"), make_seq(1000, 1, first_token=5000, rid="b")
    sched.add(a)
    sched.add(b)
    for _ in range(30):
        out = fake_step(sched)
        total = sum(chunk_cost(item.num_new_tokens, item.seq.num_computed_tokens - item.num_new_tokens, 50.0)
                    for item in out.scheduled)
        assert total <= 300 or len(out.scheduled) == 1
    assert a.num_computed_tokens > b.num_computed_tokens  # a, first in order, is served first; b gets what is left
    run_to_completion(sched)
    assert a.is_finished and b.is_finished and manager.num_free_blocks == 1000


def test_cost_aware_chunking_with_prefix_cache_and_preemption_completes_everything():
    rng = random.Random(7)
    for _ in range(30):
        manager = BlockManager(rng.randint(30, 80), BS)
        sched = Scheduler(manager, max_num_seqs=rng.randint(1, 6), max_num_batched_tokens=rng.randint(1, 40),
                          context_cost_tokens=rng.choice([1.0, 8.0, 50.0]), min_prefill_chunk=rng.randint(1, 8))
        shared = [7] * rng.randint(0, 20)
        seqs = []
        for i in range(rng.randint(1, 8)):
            prompt = shared + [100 * i + j for j in range(rng.randint(1, 40))]
            seqs.append(TokenSequence(f"r{i}", 0, prompt, SamplingParams(), max_tokens=rng.randint(1, 20)))
            sched.add(seqs[-1])
        run_to_completion(sched)
        assert all(s.is_finished for s in seqs)
        assert manager.num_free_blocks == manager.num_blocks
