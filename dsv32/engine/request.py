"""Per-request state inside the engine: a ``Request`` (what the user asked) forks into ``n`` ``TokenSequence``s.

A ``TokenSequence`` is the unit the scheduler and the KV cache see: one token stream (prompt + generated tokens) with
its own blocks. Following vLLM v1, a sequence has no "prefill" or "decode" phase: it has ``num_tokens`` known tokens
and ``num_computed_tokens`` whose KV is in the cache; each step the scheduler lets some of it catch up. ``n > 1``
forks the request into ``n`` sequences sharing the prompt (the prefix cache makes the shared prompt cheap).
"""

from __future__ import annotations

import enum
import hashlib
import itertools
from array import array
from dataclasses import dataclass, field, replace

import torch

from dsv32.engine.outputs import PositionLogprobs
from dsv32.engine.sampling_params import SamplingParams

_seq_counter = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


def hash_block_tokens(parent_hash: bytes | None, token_ids: list[int]) -> bytes:
    """Chain hash of one full block: it depends on the block's tokens and (through the parent) on every token before
    it, so equal hashes mean an equal prefix. sha256 rather than Python's ``hash``: a collision would silently serve
    another prompt's KV."""
    h = hashlib.sha256(parent_hash or b"")
    h.update(array("q", token_ids).tobytes())
    return h.digest()


@dataclass(eq=False)
class TokenSequence:
    """One completion's token stream and its cache bookkeeping."""

    request_id: str
    index: int  # which of the request's n completions
    prompt_token_ids: list[int]
    sampling_params: SamplingParams  # this completion's own params (n == 1, seed offset by index)
    max_tokens: int  # resolved: min(params.max_tokens, max_model_len - prompt length)
    # With prefix caching, siblings wait until this sequence has computed the shared prompt, then hit the cache.
    prefill_leader: TokenSequence | None = None
    seq_id: int = field(default_factory=lambda: next(_seq_counter))
    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    # Data-parallel attention: the rank whose cache holds this sequence (``block_ids`` are that rank's blocks).
    dp_rank: int | None = None
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered_blocks: int = 0  # leading blocks already offered to the prefix cache
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache when first scheduled
    num_preemptions: int = 0
    # Speculative decoding: the tokens drafted after the last known one, verified at the next step.
    spec_token_ids: list[int] = field(default_factory=list)
    # This completion's own random stream (seeded requests only): advanced once per sampled token, never during a
    # recompute, so the tokens depend on the seed and the logits alone.
    generator: torch.Generator | None = None
    # prompt_logprobs[i] belongs to prompt token i (the first is None: nothing predicts it). Only the completion
    # that reports them (index 0) has a list; it grows chunk by chunk as the prompt is computed.
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    logprobs: list[PositionLogprobs] | None = None  # per generated token, when params.logprobs is set
    cumulative_logprob: float | None = None
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def needs_prompt_logprobs(self) -> bool:
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    @property
    def in_prompt_phase(self) -> bool:
        """Still computing prompt tokens (a chunked prefill, or a recompute after preemption)."""
        return self.num_tokens - self.num_computed_tokens > 1

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def full_block_hashes(self, block_size: int) -> list[bytes]:
        """Hashes of every full block of the known tokens, computed incrementally."""
        for i in range(len(self.block_hashes), self.num_tokens // block_size):
            parent = self.block_hashes[i - 1] if i else None
            self.block_hashes.append(hash_block_tokens(parent, self.token_ids[i * block_size:(i + 1) * block_size]))
        return self.block_hashes


def child_sampling_params(params: SamplingParams, index: int) -> SamplingParams:
    """vLLM's parallel-sampling rule: each of the n children samples once, with seed + index so siblings differ
    but the whole request stays reproducible."""
    seed = None if params.seed is None else params.seed + index
    return replace(params, n=1, seed=seed)


@dataclass(eq=False)
class Request:
    """What the user submitted, plus the per-request output state shared by its sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    sequences: list[TokenSequence] = field(default_factory=list)
    stream: bool = True  # report after every step that changed it; else only once finished
    # Report cursors (each report is a delta): whether the prompt went out, and the prompt-logprob positions that did.
    reported: bool = False
    num_prompt_logprobs_reported: int = 0

    @property
    def is_finished(self) -> bool:
        return all(seq.is_finished for seq in self.sequences)

    @property
    def num_cached_tokens(self) -> int:
        return self.sequences[0].num_cached_tokens if self.sequences else 0
