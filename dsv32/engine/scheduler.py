"""The scheduler: which sequences run this step, with how many tokens each, within one token budget.

The one idea (vLLM v1): there is no prefill phase and no decode phase. Each sequence has ``num_tokens`` known tokens
and ``num_computed_tokens`` whose KV is cached; a step gives some sequences new tokens to compute so they catch up.
A decode is 1 new token, a prompt is many, split into chunks when it does not fit the budget (chunked prefill).

Policy, per step:
1. Running sequences, decodes first, then unfinished prompt chunks. When the KV cache has no room for one, the most
   recently scheduled-last running sequence is preempted by recompute (its blocks are freed and it goes back to the
   front of the waiting queue; its prefix blocks usually survive in the prefix cache).
2. If nothing was preempted, waiting sequences in arrival order (FIFO), each first served what the prefix cache
   holds, until the token budget, ``max_num_seqs`` or the free blocks run out.

Cost-aware chunking: a token's cost grows with the context it attends (the lightning indexer scores every query
against the whole context; sparse prefill attention reads the rows its chunk selected, at long context most of it),
so a fixed token budget lets one prefill chunk at long context stall every decode behind it for seconds. Besides the
token budget, the prefill chunks of a step share a *cost* budget of ``max_num_batched_tokens`` token-equivalents,
where a chunk of ``c`` tokens starting at context position ``p`` costs ``chunk_cost(c, p) = c * (1 + (p + c) / K)``
and ``K = context_cost_tokens`` is the context length at which a token's attention + indexer cost equals the rest of
its forward pass (see ``DEFAULT_CONTEXT_COST_TOKENS`` and ``estimate_context_cost_tokens``). Chunks therefore shrink
roughly like ``K / p`` at long context, so a step takes about as long as ``max_num_batched_tokens`` context-free
tokens, plus one chunk floor (``MIN_PREFILL_CHUNK``) that keeps a long prompt progressing. Decodes are not charged:
they run every step anyway. A prompt alone in the engine (nothing else running or waiting) gets chunks of at least
``ALONE_MIN_PREFILL_CHUNK`` tokens: the budget protects other sequences' steps, and small chunks at long context
cost more in all (each chunk pays work proportional to the whole context); a request that arrives meanwhile waits
that one step, and the next step shares the cost budget again.

Speculative decoding (``num_speculative_tokens`` k > 0): a decode also schedules the sequence's drafted tokens
(as many as the budget and its ``max_tokens`` leave room for) and allocates their slots, plus the k - 1 slots past
them that the drafter's chain writes. Only the accepted tokens advance ``num_computed_tokens``; the KV of rejected
drafts sits in slots that later tokens overwrite.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from dsv32.config import ModelConfig
from dsv32.engine.block_manager import BlockPool
from dsv32.engine.request import SequenceStatus, TokenSequence

# Context length K at which one token's context-dependent cost (lightning-indexer scores over the whole context, MHA
# prefill attention) equals its context-free cost (projections, MoE), for the built-in ``tiny`` preset on a CPU:
# measured on 2 cores (benchmarks/head_of_line.md) a prefill token costs about a = 0.17 ms at no context plus
# b = 0.58 us per context position, a / b ~ 290; the FLOP count of ``estimate_context_cost_tokens`` gives ~380. The
# engine's default when it does not pass a model-specific value (a real V3.2 checkpoint: ~15K, see the estimate).
DEFAULT_CONTEXT_COST_TOKENS = 320.0

# The smallest prefill chunk a step gives the first prompt it schedules, whatever the cost budget says: each chunk
# also pays a cost proportional to the whole context (reading its cached keys/latents), so tiny chunks at long
# context would make almost no progress per step (tiny model, 64K context: 16 tokens ~0.7 s a step).
MIN_PREFILL_CHUNK = 16

# The smallest chunk of a prompt alone in the engine. A 16K-token prompt (tiny V3.2 with top-2048, 2 cores): ~40-token
# cost-budget chunks 187 tok/s, 256-token chunks 278-282, 512: 290, 2048: 289. Not the whole token budget: a single
# 1024-token chunk prefilled a 1K prompt slower than the cost budget's ~500-token ones (3299 vs 3673 tok/s, five
# prompts each; noisy), and a request arriving meanwhile waits for the step.
ALONE_MIN_PREFILL_CHUNK = 512


def chunk_cost(num_tokens: int, start: int, context_cost_tokens: float | None) -> float:
    """Estimated cost, in context-free token-equivalents, of computing ``num_tokens`` tokens from context position
    ``start``: ``c * (1 + (p + c) / K)`` (``c`` itself when ``K`` is None: no context cost)."""
    if context_cost_tokens is None:
        return float(num_tokens)
    return num_tokens * (1.0 + (start + num_tokens) / context_cost_tokens)


def max_chunk_for_cost(start: int, budget: float, context_cost_tokens: float | None) -> int:
    """The largest ``c`` with ``chunk_cost(c, start) <= budget`` (0 when not even one token fits)."""
    if budget <= 0:
        return 0
    if context_cost_tokens is None:
        return int(budget)
    k = context_cost_tokens
    # c^2 / K + c (1 + p / K) - budget = 0, rounded down, then corrected for floating-point error.
    lin = 1.0 + start / k
    c = int((-lin + math.sqrt(lin * lin + 4.0 * budget / k)) * k / 2.0)
    while c > 0 and chunk_cost(c, start, k) > budget:
        c -= 1
    while chunk_cost(c + 1, start, k) <= budget:
        c += 1
    return c


def estimate_context_cost_tokens(config: ModelConfig) -> float:
    """``K`` for ``config`` from FLOP counts: multiply-adds of one token's context-free work per layer (attention
    projections, indexer projections, the dense MLP or the active experts) over the multiply-adds it spends per context
    position (indexer: ``index_n_heads * index_head_dim``; MHA-mode prefill attention: every head's query.key and
    probability.value, plus the per-chunk up-projection of the context's latents, amortised here as one more
    ``kv_b_proj`` row per position). A rough guide (it ignores memory traffic, and counts the attention as dense:
    past ``index_topk`` a query attends only its selected keys, but the expanded form the CPU uses for a long chunk
    scores every row some query of the chunk selected, at long context most of it); tiny preset ~380, DeepSeek-V3.2
    ~15K."""
    c = config
    heads, qk = c.num_attention_heads, c.qk_nope_head_dim + c.qk_rope_head_dim
    attn = (c.hidden_size * c.q_lora_rank + c.q_lora_rank * heads * qk
            + c.hidden_size * (c.kv_lora_rank + c.qk_rope_head_dim) + heads * c.v_head_dim * c.hidden_size)
    indexer = 0
    per_position = 0
    if c.has_indexer:
        indexer = c.q_lora_rank * c.index_n_heads * c.index_head_dim + c.hidden_size * (c.index_head_dim
                                                                                          + c.index_n_heads)
        per_position += c.index_n_heads * c.index_head_dim
    per_position += heads * (qk + c.v_head_dim)
    dense_mlp = 3 * c.hidden_size * c.intermediate_size
    moe = 3 * c.hidden_size * c.moe_intermediate_size * (c.num_experts_per_tok + c.n_shared_experts)
    n_dense = min(c.first_k_dense_replace, c.num_hidden_layers)
    per_token = c.num_hidden_layers * (attn + indexer) + n_dense * dense_mlp + (c.num_hidden_layers - n_dense) * moe
    return per_token / (c.num_hidden_layers * per_position)


@dataclass
class ScheduledSeq:
    seq: TokenSequence
    num_new_tokens: int  # known tokens computed for it this step, from position seq.num_computed_tokens
    spec_token_ids: list[int] = field(default_factory=list)  # drafts verified after them

    @property
    def num_scheduled_tokens(self) -> int:
        return self.num_new_tokens + len(self.spec_token_ids)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(s.num_scheduled_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Continuous batching over a ``BlockPool``: a FIFO waiting queue and a running list."""

    def __init__(self, block_manager: BlockPool, max_num_seqs: int,
                 max_num_batched_tokens: int, is_ready: Callable[[TokenSequence], bool] | None = None,
                 num_speculative_tokens: int = 0,
                 context_cost_tokens: float | None = DEFAULT_CONTEXT_COST_TOKENS,
                 min_prefill_chunk: int = MIN_PREFILL_CHUNK) -> None:
        """``is_ready``: whether a waiting sequence may start (False while its structured-output grammar compiles;
        others are admitted past it meanwhile). ``context_cost_tokens``: ``K`` of the chunk cost model (module
        docstring); None turns cost-aware chunking off (chunks limited by the token budget only)."""
        if context_cost_tokens is not None and context_cost_tokens <= 0:
            raise ValueError(f"context_cost_tokens must be positive, got {context_cost_tokens}")
        self.block_manager = block_manager
        self.is_ready = is_ready
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.num_speculative_tokens = num_speculative_tokens
        self.context_cost_tokens = context_cost_tokens
        self.min_prefill_chunk = max(1, min_prefill_chunk)
        self._cost_budget = float(max_num_batched_tokens)
        self._any_prefill = False
        self._alone = False
        self.waiting: deque[TokenSequence] = deque()
        self.running: list[TokenSequence] = []
        self.num_preemptions = 0

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: TokenSequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def finish(self, seq: TokenSequence, finish_reason: str, stop_reason: int | str | None = None) -> None:
        """End ``seq`` (stopped, length or aborted) wherever it is, and release its blocks."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = finish_reason
        seq.stop_reason = stop_reason
        self.block_manager.register_computed_blocks(seq)  # blocks completed by its last tokens
        self.block_manager.free(seq)

    # ---- one step -----------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        self._cost_budget = float(self.max_num_batched_tokens)  # shared by this step's prefill chunks
        self._any_prefill = False
        self._alone = len(self.running) + len(self.waiting) == 1
        # Decodes first (they are latency-bound and need one token each), then prompt chunks, each in arrival order.
        # Preemption victims come from the end of this order, so a victim has never been scheduled this step.
        order = [s for s in self.running if not s.in_prompt_phase] + [s for s in self.running if s.in_prompt_phase]
        i = 0
        while i < len(order) and budget > 0:
            seq = order[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if seq.in_prompt_phase:
                num_new = self._prefill_chunk(seq.num_computed_tokens, num_new)
                if num_new == 0:  # the step's cost budget is spent: this prompt continues next step
                    i += 1
                    continue
            drafts: list[int] = []
            # Structured outputs are not drafted for: their grammar masks each position from the tokens before it.
            if num_new == seq.num_tokens - seq.num_computed_tokens and seq.sampling_params.structured_outputs is None:
                # At most max_tokens - 1 more outputs can be drafts: the step always adds one token of its own.
                room = min(budget - num_new, seq.max_tokens - seq.num_output_tokens - 1)
                drafts = seq.spec_token_ids[:max(0, room)]
            seq.spec_token_ids = []
            while not self.block_manager.allocate(seq, self._num_slots(seq, seq.num_computed_tokens, num_new,
                                                                  len(drafts))):
                victim = self._victim(seq, order)
                self._preempt(victim)
                out.num_preempted += 1
                if victim is seq:
                    break
            else:
                item = ScheduledSeq(seq, num_new, drafts)
                out.scheduled.append(item)
                budget -= item.num_scheduled_tokens
                if seq.in_prompt_phase:
                    self._charge(seq.num_computed_tokens, num_new)
                i += 1
        # vLLM's rule: a step that had to preempt admits nobody new (the cache is already too tight).
        if out.num_preempted == 0:
            budget = self._admit_waiting(out, budget)
        return out

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> int:
        held_back: list[TokenSequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self._waits_for_leader(seq) or (self.is_ready is not None and not self.is_ready(seq)):
                held_back.append(self.waiting.popleft())
                continue
            cached: list[int] = []
            # Prompt logprobs need the logits of every prompt position, so such a sequence computes all of it.
            if self.block_manager.enable_prefix_caching and not seq.needs_prompt_logprobs:
                cached = self.block_manager.find_cached_prefix(seq)
            num_cached_tokens = len(cached) * self.block_manager.block_size
            num_new = min(seq.num_tokens - num_cached_tokens, budget)
            if num_new > 1:
                num_new = self._prefill_chunk(num_cached_tokens, num_new)
                if num_new == 0:
                    break  # the cost budget is spent; FIFO: nobody overtakes the head of the queue
            if not self.block_manager.allocate(seq, self._num_slots(seq, num_cached_tokens, num_new, 0), cached):
                break  # FIFO: nobody overtakes the head of the queue
            if self.block_manager.enable_prefix_caching:
                self.block_manager.record_prefix_query(seq.num_tokens, num_cached_tokens)
            if seq.num_preemptions == 0:  # what the user sees: the first admission's cache hit
                seq.num_cached_tokens = num_cached_tokens
            seq.num_computed_tokens = num_cached_tokens
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
            if num_new > 1:
                self._charge(num_cached_tokens, num_new)
        self.waiting.extendleft(reversed(held_back))
        return budget

    def _prefill_chunk(self, start: int, limit: int) -> int:
        """Tokens a prompt chunk from position ``start`` gets (at most ``limit``, what the token budget and the prompt
        leave): as many as the step's remaining cost budget pays for; the first prompt chunk of a step gets at least
        ``min_prefill_chunk`` tokens (progress), later ones may get 0 (they wait for the next step). A prompt alone
        in the engine gets at least ``ALONE_MIN_PREFILL_CHUNK`` (module docstring)."""
        num_new = min(limit, max_chunk_for_cost(start, self._cost_budget, self.context_cost_tokens))
        if self._alone:  # no other sequence's step to protect
            num_new = max(num_new, min(limit, ALONE_MIN_PREFILL_CHUNK))
        elif not self._any_prefill:
            num_new = max(num_new, min(limit, self.min_prefill_chunk))
        return num_new

    def _charge(self, start: int, num_new: int) -> None:
        self._cost_budget -= chunk_cost(num_new, start, self.context_cost_tokens)
        self._any_prefill = True

    def _num_slots(self, seq: TokenSequence, start: int, num_new: int, num_drafts: int) -> int:
        """Cache slots a step needs past position ``start``: its tokens and drafts and, when the sequence catches up
        (and so drafts after the step), the k - 1 positions the drafter's chain writes past them, but never beyond
        the last position whose KV the sequence can need (its last possible token is never computed)."""
        num_slots = num_new + num_drafts
        if self.num_speculative_tokens and start + num_new == seq.num_tokens:
            last_needed = seq.num_prompt_tokens + seq.max_tokens - 1
            num_slots = max(num_slots, min(num_slots + self.num_speculative_tokens - 1, last_needed - start))
        return num_slots

    def _waits_for_leader(self, seq: TokenSequence) -> bool:
        """An n > 1 sibling waits until its leader has computed (and cached) the shared prompt."""
        leader = seq.prefill_leader
        return (
            leader is not None
            and self.block_manager.enable_prefix_caching
            and not leader.is_finished
            and leader.num_computed_tokens < leader.num_prompt_tokens
        )

    def _victim(self, seq: TokenSequence, order: list[TokenSequence]) -> TokenSequence:
        """The last sequence in ``order`` whose blocks ``seq`` could use (with data-parallel attention: one on the
        same rank), taken out of ``order``; ``seq`` itself when there is none before it."""
        for i in range(len(order) - 1, -1, -1):
            if order[i] is seq or self.block_manager.shares_pool(seq, order[i]):
                return order.pop(i)
        raise AssertionError("a scheduled sequence is missing from the step's order")

    def _preempt(self, seq: TokenSequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.spec_token_ids = []  # drafted from state that is being recomputed; the recompute drafts afresh
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def on_step_done(self, out: SchedulerOutput, num_accepted: Mapping[TokenSequence, int]) -> None:
        """The model wrote the scheduled tokens' KV: advance each sequence over its known tokens and its accepted
        drafts (``num_accepted``), and offer its full blocks to the prefix cache."""
        for item in out.scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens + num_accepted.get(item.seq, 0)
            self.block_manager.register_computed_blocks(item.seq)
