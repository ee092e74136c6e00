"""Block accounting and prefix cache: allocation, sharing by reference count, LRU eviction, no leaks; with
data-parallel attention, placement on a rank, one cache per rank, and what a failed allocation leaves behind."""

from dsv32.engine.block_manager import BlockManager, BlockPool, DataParallelBlockManager
from dsv32.engine.request import TokenSequence, hash_block_tokens
from dsv32.engine.sampling_params import SamplingParams

BS = 4


def make_seq(tokens: list[int]) -> TokenSequence:
    return TokenSequence("r", 0, tokens, SamplingParams(), max_tokens=8)


def compute(manager: BlockPool, seq: TokenSequence, cached: list[int] | None = None) -> None:
    """Pretend the model computed the whole sequence: allocate, advance, register."""
    num_cached = len(cached or []) * BS
    assert manager.allocate(seq, seq.num_tokens - num_cached, cached)
    seq.num_computed_tokens = seq.num_tokens
    manager.register_computed_blocks(seq)


def test_allocate_and_free_returns_every_block():
    manager = BlockManager(num_blocks=8, block_size=BS)
    seq = make_seq(list(range(10)))
    assert manager.allocate(seq, 10)
    assert len(seq.block_ids) == 3 and manager.num_free_blocks == 5
    assert manager.allocate(seq, 0)  # nothing new needed
    seq.num_computed_tokens = 10
    assert manager.allocate(seq, 2) and len(seq.block_ids) == 3  # 12 tokens still fit in 3 blocks
    assert manager.allocate(seq, 3) and len(seq.block_ids) == 4
    manager.free(seq)
    assert manager.num_free_blocks == 8 and seq.block_ids == []


def test_allocate_fails_without_side_effects():
    manager = BlockManager(num_blocks=2, block_size=BS)
    seq = make_seq(list(range(12)))
    assert not manager.allocate(seq, 12)
    assert seq.block_ids == [] and manager.num_free_blocks == 2


def test_chain_hash_depends_on_prefix():
    a = hash_block_tokens(None, [1, 2, 3, 4])
    assert a == hash_block_tokens(None, [1, 2, 3, 4])
    assert hash_block_tokens(a, [5, 6, 7, 8]) != hash_block_tokens(None, [5, 6, 7, 8])


def test_prefix_hit_shares_blocks_and_leaves_last_token_to_compute():
    manager = BlockManager(num_blocks=16, block_size=BS)
    first = make_seq(list(range(8)))
    compute(manager, first)
    # An exact repeat of an 8-token (2-block) prompt may only reuse 1 block: the last token must be computed.
    again = make_seq(list(range(8)))
    assert manager.find_cached_prefix(again) == first.block_ids[:1]
    longer = make_seq(list(range(8)) + [99, 98, 97])
    hit = manager.find_cached_prefix(longer)
    assert hit == first.block_ids[:2]
    compute(manager, longer, hit)
    assert longer.block_ids[:2] == first.block_ids[:2]
    manager.free(first)
    manager.free(longer)
    assert manager.num_free_blocks == 16
    # The cache survives freeing: a different tail still hits the shared head.
    other = make_seq(list(range(8)) + [5])
    assert len(manager.find_cached_prefix(other)) == 2


def test_divergent_prefix_stops_the_hit():
    manager = BlockManager(num_blocks=16, block_size=BS)
    compute(manager, make_seq(list(range(12))))
    probe = make_seq([0, 1, 2, 3, 9, 9, 9, 9, 8, 9, 10, 11, 12])
    assert len(manager.find_cached_prefix(probe)) == 1


def test_lru_eviction_takes_oldest_free_cached_block_and_unhashed_first():
    manager = BlockManager(num_blocks=4, block_size=BS)
    old = make_seq([1] * 4 + [0])
    compute(manager, old)  # blocks: [cached full, partial]
    manager.free(old)
    new = make_seq([2] * 4 + [0])
    compute(manager, new)
    manager.free(new)
    # 4 blocks, all free: 2 hold cached prefixes. Two unhashed partial blocks are reused before either.
    grab = make_seq([3] * 8)
    assert manager.allocate(grab, 8)
    assert len(manager.find_cached_prefix(make_seq([1] * 4 + [7]))) == 1
    assert len(manager.find_cached_prefix(make_seq([2] * 4 + [7]))) == 1
    # One more block evicts the least recently freed cached block (``old``'s), not ``new``'s.
    grab.num_computed_tokens = 8
    assert manager.allocate(grab, 1)
    assert manager.find_cached_prefix(make_seq([1] * 4 + [7])) == []
    assert len(manager.find_cached_prefix(make_seq([2] * 4 + [7]))) == 1
    manager.free(grab)
    assert manager.num_free_blocks == 4


def test_reviving_a_free_cached_block_counts_against_capacity():
    manager = BlockManager(num_blocks=2, block_size=BS)
    first = make_seq([1] * 4 + [0])
    compute(manager, first)
    manager.free(first)
    seq = make_seq([1] * 4 + [0] * 8)  # 3 blocks needed, 1 cached: still 3 > 2
    hit = manager.find_cached_prefix(seq)
    assert len(hit) == 1
    assert not manager.allocate(seq, seq.num_tokens - BS, hit)
    assert manager.num_free_blocks == 2 and seq.block_ids == []


def test_duplicate_blocks_computed_concurrently_keep_one_cache_entry():
    manager = BlockManager(num_blocks=8, block_size=BS)
    a, b = make_seq(list(range(5))), make_seq(list(range(5)))
    assert manager.allocate(a, 5) and manager.allocate(b, 5)
    a.num_computed_tokens = b.num_computed_tokens = 5
    manager.register_computed_blocks(a)
    manager.register_computed_blocks(b)
    assert manager.find_cached_prefix(make_seq(list(range(6)))) == a.block_ids[:1]
    manager.free(a)
    manager.free(b)
    assert manager.num_free_blocks == 8


def test_prefix_caching_disabled_never_hits():
    manager = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    compute(manager, make_seq(list(range(9))))
    assert manager.find_cached_prefix(make_seq(list(range(9)))) == []


def test_reset_prefix_cache():
    manager = BlockManager(num_blocks=8, block_size=BS)
    seq = make_seq(list(range(9)))
    compute(manager, seq)
    assert not manager.reset_prefix_cache()  # blocks in use
    manager.free(seq)
    assert manager.reset_prefix_cache()
    assert manager.find_cached_prefix(make_seq(list(range(9)))) == []


def test_with_a_drafter_a_hit_keeps_its_last_block_only_if_the_same_token_followed_it():
    # The drafter's cache entry at a block's last position was computed from the token after the block.
    kv = BlockManager(num_blocks=8, block_size=BS, match_next_token=True)
    first = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    compute(kv, first)
    kv.free(first)
    same = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    diverging = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 42, 10])
    assert len(kv.find_cached_prefix(same)) == 2
    assert len(kv.find_cached_prefix(diverging)) == 1
    # Only blocks followed by a known token are registered: [1..4] and [5..8] here, not a block ending the tokens.
    edge = make_seq([11, 12, 13, 14])
    compute(kv, edge)
    edge.append_token(15)
    assert kv.find_cached_prefix(make_seq([11, 12, 13, 14, 15])) == []
    kv.register_computed_blocks(edge)
    assert len(kv.find_cached_prefix(make_seq([11, 12, 13, 14, 15]))) == 1
    kv.free(edge)
    # Without a drafter the whole hit is kept.
    plain = BlockManager(num_blocks=8, block_size=BS)
    compute(plain, make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    assert len(plain.find_cached_prefix(make_seq([1, 2, 3, 4, 5, 6, 7, 8, 42, 10]))) == 2


# ---- data-parallel attention: one BlockManager per rank ----------------------------------------------------------


def test_sequences_are_placed_on_the_rank_with_the_most_free_blocks():
    manager = DataParallelBlockManager(dp_size=2, num_blocks=8, block_size=BS)
    assert (manager.num_blocks, manager.num_free_blocks, manager.usage) == (16, 16, 0.0)
    a, b, c = make_seq(list(range(12))), make_seq(list(range(20, 28))), make_seq(list(range(40, 44)))
    assert manager.allocate(a, 12) and a.dp_rank == 0  # a tie goes to the lowest rank
    assert manager.allocate(b, 8) and b.dp_rank == 1  # 8 free against rank 0's 5
    assert manager.allocate(c, 4) and c.dp_rank == 1  # 6 free against 5
    # Block ids are the rank's own: both ranks hand out their block 0 first.
    assert a.block_ids == [0, 1, 2] and b.block_ids == [0, 1] and c.block_ids == [2]
    assert manager.num_free_blocks == 10 and manager.usage == 6 / 16
    assert manager.shares_pool(b, c) and not manager.shares_pool(a, b)
    # A placed sequence stays on its rank as it grows, whatever the other rank has free.
    a.num_computed_tokens = 12
    assert manager.allocate(a, 5) and a.dp_rank == 0 and a.block_ids == [0, 1, 2, 3, 4]
    # Freed, a sequence leaves its rank: recomputed after a preemption it may be placed anew.
    for seq in (a, b, c):
        manager.free(seq)
        assert seq.dp_rank is None and seq.block_ids == []
    assert manager.num_free_blocks == 16


def test_each_rank_has_its_own_prefix_cache():
    manager = DataParallelBlockManager(dp_size=2, num_blocks=8, block_size=BS)
    first = make_seq(list(range(9)))
    compute(manager, first)
    assert first.dp_rank == 0
    # A repeat goes where its prefix is cached, though rank 1 has more free blocks, and shares rank 0's blocks.
    again = make_seq(list(range(9)) + [50])
    hit = manager.find_cached_prefix(again)
    assert again.dp_rank == 0 and hit == first.block_ids[:2]
    compute(manager, again, hit)
    manager.record_prefix_query(again.num_tokens, len(hit) * BS)
    assert again.block_ids[:2] == first.block_ids[:2]
    assert (manager.prefix_cache_queries, manager.prefix_cache_hits) == (10, 8)
    # Rank 1 does not see rank 0's cache: a sequence placed there computes the same prefix again.
    other = make_seq(list(range(30, 42)))
    compute(manager, other)
    assert other.dp_rank == 1
    assert manager.ranks[1].find_cached_prefix(make_seq(list(range(9)) + [51])) == []
    for seq in (first, again, other):
        manager.free(seq)
    assert manager.num_free_blocks == 16


def test_reset_prefix_cache_needs_every_rank_idle():
    manager = DataParallelBlockManager(dp_size=2, num_blocks=4, block_size=BS)
    cached, busy = make_seq(list(range(9))), make_seq(list(range(20, 29)))
    compute(manager, cached)
    compute(manager, busy)
    manager.free(cached)
    assert (cached.dp_rank, busy.dp_rank) == (None, 1)  # rank 0 is idle, rank 1 is not
    assert not manager.reset_prefix_cache()
    assert len(manager.find_cached_prefix(make_seq(list(range(9))))) == 2
    manager.free(busy)
    assert manager.reset_prefix_cache()
    assert manager.find_cached_prefix(make_seq(list(range(9)))) == []


def test_a_failed_allocation_changes_nothing_and_leaves_the_sequence_unplaced():
    manager = DataParallelBlockManager(dp_size=2, num_blocks=4, block_size=BS)
    big, small = make_seq(list(range(12))), make_seq(list(range(20, 28)))
    assert manager.allocate(big, 12) and manager.allocate(small, 8)
    assert (big.dp_rank, small.dp_rank) == (0, 1)  # free: rank 0 one block, rank 1 two
    waiting = make_seq(list(range(40, 52)))  # three blocks: room on neither rank
    assert not manager.allocate(waiting, 12)
    assert waiting.block_ids == [] and manager.num_free_blocks == 3
    # It was tried on rank 1 but holds nothing there: once rank 0 has room, it goes there.
    assert waiting.dp_rank is None
    manager.free(big)
    assert manager.allocate(waiting, 12) and waiting.dp_rank == 0
    # A sequence that holds blocks keeps its rank when it cannot grow.
    waiting.num_computed_tokens = 12
    assert not manager.allocate(waiting, 8) and waiting.dp_rank == 0 and len(waiting.block_ids) == 3
    manager.free(waiting)
    manager.free(small)
    assert manager.num_free_blocks == 8
