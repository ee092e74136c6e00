"""Paged KV-cache block accounting and the prefix cache (block ids only; the tensors belong to the model).

Every layer's caches (MLA latent + rope key, indexer key) share one block table, so one ``BlockManager`` hands
out block ids for all of them. A block holds ``block_size`` consecutive tokens of one sequence.

Prefix caching (vLLM v1's design): a *full* block whose KV has been computed is registered under the chain hash of
its tokens (see ``request.hash_block_tokens``). Blocks are shared by reference count. A block whose count drops to 0
goes to the free queue but keeps its hash, so a later prompt with the same prefix can take it back; allocation takes
blocks from the front of the free queue (least recently freed first) and only then forgets their hash (LRU
eviction). Blocks that hold nothing reusable go to the front so they are reused before any cached block.

With an MTP drafter the cache also holds the MTP layer's entries, and the entry at position ``p`` is computed from
the token at ``p + 1``: the last entry of a block depends on the first token of the *next* block, which the block's
hash does not cover. So (``match_next_token``) each cached block remembers that token, and a hit whose last block
was followed by another token drops that block (it is recomputed into a private block). vLLM always drops the last
matched block; keeping it when the next token agrees keeps the whole hit for a repeated prompt, and sharing the
drafter's entries with the blocks (same block ids) means they are there whenever the main model's are.

Data-parallel attention (``DataParallelBlockManager``): each rank has its own cache, so each has its own
``BlockManager``; a sequence is placed on one rank when it is first admitted (the one with its longest cached prefix,
else the one with the most free blocks) and its block ids are that rank's.

The scheduler and the engine see either through the ``BlockPool`` interface (``make_block_pool`` picks one).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from dsv32.config import EngineConfig
from dsv32.engine.request import TokenSequence


class BlockPool(Protocol):
    """What the scheduler and the engine use of the KV-cache blocks (one cache, or one per data-parallel rank); each
    member means what ``BlockManager``'s does."""

    num_blocks: int
    block_size: int
    enable_prefix_caching: bool

    @property
    def num_free_blocks(self) -> int: ...

    @property
    def usage(self) -> float: ...

    @property
    def prefix_cache_queries(self) -> int: ...

    @property
    def prefix_cache_hits(self) -> int: ...

    def blocks_needed(self, num_tokens: int) -> int: ...

    def find_cached_prefix(self, seq: TokenSequence) -> list[int]: ...

    def record_prefix_query(self, num_query_tokens: int, num_hit_tokens: int) -> None: ...

    def allocate(self, seq: TokenSequence, num_new_tokens: int, cached_block_ids: list[int] | None = None) -> bool: ...

    def register_computed_blocks(self, seq: TokenSequence) -> None: ...

    def free(self, seq: TokenSequence) -> None: ...

    def reset_prefix_cache(self) -> bool: ...

    def shares_pool(self, a: TokenSequence, b: TokenSequence) -> bool: ...


def make_block_pool(engine_config: EngineConfig, num_blocks: int) -> BlockPool:
    """``num_blocks`` per cache: one cache, or one per data-parallel attention rank. With an MTP drafter a cached
    block must match the token after it (see above)."""
    match_next_token = engine_config.num_speculative_tokens > 0
    if engine_config.data_parallel_size > 1:
        return DataParallelBlockManager(engine_config.data_parallel_size, num_blocks, engine_config.block_size,
                                        engine_config.enable_prefix_caching, match_next_token)
    return BlockManager(num_blocks, engine_config.block_size, engine_config.enable_prefix_caching, match_next_token)


@dataclass
class _Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None
    next_token: int | None = None  # the token after the block when it was registered (match_next_token)


class BlockManager:
    """Allocates block ids to sequences and finds cached prefixes."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 match_next_token: bool = False) -> None:
        if num_blocks <= 0:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.match_next_token = match_next_token
        self._blocks = [_Block(i) for i in range(num_blocks)]
        # Blocks with ref_cnt 0, in eviction order (front first). An OrderedDict gives O(1) removal from the middle.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[bytes, int] = {}
        # Counters in tokens, vLLM's prefix_cache_queries / prefix_cache_hits.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ---- queries ------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (free ones, including cached blocks nobody references)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by live sequences (vLLM's kv_cache_usage_perc, 0..1)."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, seq: TokenSequence) -> list[int]:
        """Block ids of the longest cached prefix of ``seq``'s tokens (not yet referenced: pass them to
        ``allocate``). At most ``num_tokens - 1`` tokens are served from cache, so the last token is always computed
        and yields the logits to sample from."""
        if not self.enable_prefix_caching:
            return []
        hashes = seq.full_block_hashes(self.block_size)
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hit: list[int] = []
        for block_hash in hashes[:max_blocks]:
            block_id = self._cached.get(block_hash)
            if block_id is None:
                break
            hit.append(block_id)
        if self.match_next_token and hit:
            if self._blocks[hit[-1]].next_token != seq.token_ids[len(hit) * self.block_size]:
                hit.pop()
        return hit

    def record_prefix_query(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_cache_queries += num_query_tokens
        self.prefix_cache_hits += num_hit_tokens

    # ---- mutation -----------------------------------------------------------------------------------
    def allocate(self, seq: TokenSequence, num_new_tokens: int, cached_block_ids: list[int] | None = None) -> bool:
        """Make room for ``num_new_tokens`` more computed tokens of ``seq``. ``cached_block_ids`` (from
        ``find_cached_prefix``, for a sequence with no blocks yet) become its first blocks and count as computed
        tokens: the caller advances ``num_computed_tokens`` past them. Returns False, changing nothing, when there
        are not enough free blocks."""
        cached_block_ids = cached_block_ids or []
        # Cached blocks that nobody references sit in the free queue: taking them costs free capacity too.
        num_revived = sum(1 for b in cached_block_ids if self._blocks[b].ref_cnt == 0)
        num_total = len(seq.block_ids) + len(cached_block_ids)
        num_tokens = seq.num_computed_tokens + len(cached_block_ids) * self.block_size + num_new_tokens
        num_needed = max(0, self.blocks_needed(num_tokens) - num_total)
        if num_needed + num_revived > len(self._free):
            return False
        if cached_block_ids:  # they are registered already
            for block_id in cached_block_ids:
                self._ref(block_id)
            seq.block_ids.extend(cached_block_ids)
            seq.num_registered_blocks = len(seq.block_ids)
        for _ in range(num_needed):
            block_id, _ = self._free.popitem(last=False)
            block = self._blocks[block_id]
            if block.block_hash is not None:  # evict: its content is about to be overwritten
                del self._cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            seq.block_ids.append(block_id)
        return True

    def register_computed_blocks(self, seq: TokenSequence) -> None:
        """Offer ``seq``'s newly completed full blocks to the prefix cache (call after its KV was written). Only
        blocks of known tokens count (with speculation the accepted drafts are computed before they are appended),
        and with ``match_next_token`` only blocks followed by a known token."""
        if not self.enable_prefix_caching:
            return
        num_known = seq.num_tokens - 1 if self.match_next_token else seq.num_tokens
        num_full = min(min(seq.num_computed_tokens, num_known) // self.block_size, len(seq.block_ids))
        if num_full <= seq.num_registered_blocks:
            return
        hashes = seq.full_block_hashes(self.block_size)
        for i in range(seq.num_registered_blocks, num_full):
            block = self._blocks[seq.block_ids[i]]
            # Two sequences may compute the same block in the same step: the first one registered wins, the other
            # copy stays private and is recycled first when freed.
            if block.block_hash is None and hashes[i] not in self._cached:
                block.block_hash = hashes[i]
                self._cached[hashes[i]] = block.block_id
                if self.match_next_token:
                    block.next_token = seq.token_ids[(i + 1) * self.block_size]
        seq.num_registered_blocks = num_full

    def free(self, seq: TokenSequence) -> None:
        """Drop ``seq``'s references. Tail blocks are freed first so they are evicted before the shared head."""
        for block_id in reversed(seq.block_ids):
            block = self._blocks[block_id]
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block_id] = None
                if block.block_hash is None:
                    self._free.move_to_end(block_id, last=False)
        seq.block_ids = []
        seq.num_registered_blocks = 0

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (vLLM's /reset_prefix_cache). Only possible while no block is in use."""
        if len(self._free) != self.num_blocks:
            return False
        for block in self._blocks:
            block.block_hash = None
        self._cached.clear()
        return True

    def shares_pool(self, a: TokenSequence, b: TokenSequence) -> bool:
        """Whether freeing ``b``'s blocks can make room for ``a`` (always: one pool)."""
        return True

    def _ref(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_cnt == 0:
            del self._free[block_id]
        block.ref_cnt += 1


class DataParallelBlockManager:
    """One ``BlockManager`` per data-parallel attention rank behind the ``BlockManager`` interface the scheduler
    uses; ``TokenSequence.dp_rank`` says whose blocks a sequence holds."""

    def __init__(self, dp_size: int, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 match_next_token: bool = False) -> None:
        self.ranks = [BlockManager(num_blocks, block_size, enable_prefix_caching, match_next_token)
                      for _ in range(dp_size)]
        self.num_blocks = dp_size * num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching

    @property
    def num_free_blocks(self) -> int:
        return sum(rank.num_free_blocks for rank in self.ranks)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def prefix_cache_queries(self) -> int:
        return sum(rank.prefix_cache_queries for rank in self.ranks)

    @property
    def prefix_cache_hits(self) -> int:
        return sum(rank.prefix_cache_hits for rank in self.ranks)

    def blocks_needed(self, num_tokens: int) -> int:
        return self.ranks[0].blocks_needed(num_tokens)

    def _place(self, seq: TokenSequence) -> BlockManager:
        """``seq``'s rank, chosen on its first admission: the longest cached prefix, then the most free blocks."""
        if seq.dp_rank is None:
            hits = [len(rank.find_cached_prefix(seq)) for rank in self.ranks]
            seq.dp_rank = max(range(len(self.ranks)), key=lambda r: (hits[r], self.ranks[r].num_free_blocks, -r))
        return self.ranks[seq.dp_rank]

    def find_cached_prefix(self, seq: TokenSequence) -> list[int]:
        return self._place(seq).find_cached_prefix(seq)

    def record_prefix_query(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        self.ranks[0].record_prefix_query(num_query_tokens, num_hit_tokens)

    def allocate(self, seq: TokenSequence, num_new_tokens: int, cached_block_ids: list[int] | None = None) -> bool:
        if self._place(seq).allocate(seq, num_new_tokens, cached_block_ids):
            return True
        if not seq.block_ids:
            # It holds nothing on the rank it was placed on for this try: unplaced, its next try may go to a rank
            # that has room by then (kept there, a waiting sequence would stall the queue behind it until that
            # rank freed blocks, however many the others had).
            seq.dp_rank = None
        return False

    def register_computed_blocks(self, seq: TokenSequence) -> None:
        if seq.dp_rank is not None:
            self.ranks[seq.dp_rank].register_computed_blocks(seq)

    def free(self, seq: TokenSequence) -> None:
        """Release ``seq``'s blocks; a sequence that holds none may be placed anew when it comes back."""
        if seq.dp_rank is not None:
            self.ranks[seq.dp_rank].free(seq)
            seq.dp_rank = None

    def reset_prefix_cache(self) -> bool:
        if any(rank.num_free_blocks != rank.num_blocks for rank in self.ranks):
            return False
        return all(rank.reset_prefix_cache() for rank in self.ranks)

    def shares_pool(self, a: TokenSequence, b: TokenSequence) -> bool:
        return a.dp_rank == b.dp_rank
