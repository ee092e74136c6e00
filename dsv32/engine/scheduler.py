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

Speculative decoding (``num_speculative_tokens`` k > 0): a decode also schedules the sequence's drafted tokens
(as many as the budget and its ``max_tokens`` leave room for) and allocates their slots, plus the k - 1 slots past
them that the drafter's chain writes. Only the accepted tokens advance ``num_computed_tokens``; the KV of rejected
drafts sits in slots that later tokens overwrite.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from dsv32.engine.block_manager import BlockManager, DataParallelBlockManager
from dsv32.engine.request import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
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
    """Continuous batching over a ``BlockManager``: a FIFO waiting queue and a running list."""

    def __init__(self, block_manager: BlockManager | DataParallelBlockManager, max_num_seqs: int,
                 max_num_batched_tokens: int, is_ready: Callable[[Sequence], bool] | None = None,
                 num_speculative_tokens: int = 0) -> None:
        """``is_ready``: whether a waiting sequence may start (False while its structured-output grammar compiles;
        others are admitted past it meanwhile)."""
        self.block_manager = block_manager
        self.is_ready = is_ready
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.num_speculative_tokens = num_speculative_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
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

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def finish(self, seq: Sequence, finish_reason: str, stop_reason: int | str | None = None) -> None:
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
        # Decodes first (they are latency-bound and need one token each), then prompt chunks, each in arrival order.
        # Preemption victims come from the end of this order, so a victim has never been scheduled this step.
        order = [s for s in self.running if not s.in_prompt_phase] + [s for s in self.running if s.in_prompt_phase]
        i = 0
        while i < len(order) and budget > 0:
            seq = order[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
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
                i += 1
        # vLLM's rule: a step that had to preempt admits nobody new (the cache is already too tight).
        if out.num_preempted == 0:
            budget = self._admit_waiting(out, budget)
        return out

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> int:
        held_back: list[Sequence] = []
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
        self.waiting.extendleft(reversed(held_back))
        return budget

    def _num_slots(self, seq: Sequence, start: int, num_new: int, num_drafts: int) -> int:
        """Cache slots a step needs past position ``start``: its tokens and drafts and, when the sequence catches up
        (and so drafts after the step), the k - 1 positions the drafter's chain writes past them, but never beyond
        the last position whose KV the sequence can need (its last possible token is never computed)."""
        num_slots = num_new + num_drafts
        if self.num_speculative_tokens and start + num_new == seq.num_tokens:
            last_needed = seq.num_prompt_tokens + seq.max_tokens - 1
            num_slots = max(num_slots, min(num_slots + self.num_speculative_tokens - 1, last_needed - start))
        return num_slots

    def _waits_for_leader(self, seq: Sequence) -> bool:
        """An n > 1 sibling waits until its leader has computed (and cached) the shared prompt."""
        leader = seq.prefill_leader
        return (
            leader is not None
            and self.block_manager.enable_prefix_caching
            and not leader.is_finished
            and leader.num_computed_tokens < leader.num_prompt_tokens
        )

    def _victim(self, seq: Sequence, order: list[Sequence]) -> Sequence:
        """The last sequence in ``order`` whose blocks ``seq`` could use (with data-parallel attention: one on the
        same rank), taken out of ``order``; ``seq`` itself when there is none before it."""
        for i in range(len(order) - 1, -1, -1):
            if order[i] is seq or self.block_manager.shares_pool(seq, order[i]):
                return order.pop(i)
        raise AssertionError("a scheduled sequence is missing from the step's order")

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.spec_token_ids = []  # drafted from state that is being recomputed; the recompute drafts afresh
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def on_step_done(self, out: SchedulerOutput, num_accepted: Mapping[Sequence, int]) -> None:
        """The model wrote the scheduled tokens' KV: advance each sequence over its known tokens and its accepted
        drafts (``num_accepted``), and offer its full blocks to the prefix cache."""
        for item in out.scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens + num_accepted.get(item.seq, 0)
            self.block_manager.register_computed_blocks(item.seq)
