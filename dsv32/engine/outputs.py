"""What the engine hands back: per request ``RequestOutput`` / ``CompletionOutput`` / ``Logprob`` (vLLM's shapes), and
the ``EngineStats`` snapshot behind /metrics.

The engine core emits outputs with delta semantics (vLLM's ``RequestOutputKind.DELTA``): each one carries only what
its request gained since the previous one, in-process and across the process boundary alike; whoever needs the whole
answer folds the deltas together with ``RequestOutput.add``. Logprob entries leave the engine as token ids, floats
and ranks; ``decoded_token`` is filled where the text is wanted (``fill_decoded_tokens``, ``logprob_token_text``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dsv32.tokenizer import Tokenizer


@dataclass
class Logprob:
    """One candidate token's log-probability, its rank among all tokens (1 = best) and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One dict per position: token id -> Logprob (the sampled/prompt token plus the top-k alternatives).
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    """One of the ``n`` completions of a request. From the engine, ``text``/``token_ids``/``logprobs`` are what is new
    since the request's previous output; ``cumulative_logprob`` and the finish fields are absolute."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, delta: CompletionOutput) -> None:
        """Append the next delta of this completion (in place)."""
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(delta.logprobs)
        self.cumulative_logprob = delta.cumulative_logprob
        self.finish_reason = delta.finish_reason
        self.stop_reason = delta.stop_reason


@dataclass
class RequestOutput:
    """One request's output: from the engine, a delta (what is new since the request's previous output), which
    holds every one of its ``n`` completions, finished ones too; ``add`` folds the next delta in.

    ``prompt`` and ``prompt_token_ids`` come in the request's first output only (later deltas: None and []), so
    they cross the process boundary once; ``prompt_logprobs`` holds the positions not reported before (None when
    not asked for). ``finished`` and ``num_cached_tokens`` are absolute.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0

    def add(self, delta: RequestOutput) -> None:
        """Fold the next delta of the same request into this output (in place; vLLM's ``RequestOutput.add``)."""
        completions = {completion.index: completion for completion in self.outputs}
        for completion in delta.outputs:
            if completion.index in completions:
                completions[completion.index].add(completion)
            else:
                self.outputs.append(completion)
        if delta.prompt_logprobs is not None:
            if self.prompt_logprobs is None:
                self.prompt_logprobs = []
            self.prompt_logprobs.extend(delta.prompt_logprobs)
        self.finished = delta.finished
        self.num_cached_tokens = delta.num_cached_tokens


def logprob_token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """A logprob entry's token as text (vLLM's ``decoded_token``: the token alone, special tokens shown)."""
    return tokenizer.decode([token_id], skip_special_tokens=False)


def fill_decoded_tokens(out: RequestOutput, tokenizer: Tokenizer) -> None:
    """Fill ``decoded_token`` of every logprob entry of ``out`` (generated and prompt positions), in place."""
    positions = [position for completion in out.outputs for position in completion.logprobs or ()]
    positions += [position for position in out.prompt_logprobs or () if position is not None]
    for position in positions:
        for token_id, entry in position.items():
            entry.decoded_token = logprob_token_text(tokenizer, token_id)


@dataclass
class EngineStats:
    """A snapshot for /metrics and the periodic log line (vLLM's metric names in comments)."""

    num_running: int  # vllm:num_requests_running (sequences)
    num_waiting: int  # vllm:num_requests_waiting
    num_total_blocks: int
    num_free_blocks: int
    kv_cache_usage: float  # vllm:kv_cache_usage_perc, 0..1
    prefix_cache_queries: int  # tokens looked up
    prefix_cache_hits: int  # tokens found
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    spec_decode: SpecDecodeStats | None = None  # vllm:spec_decode_*, when speculative decoding is on
    weight_bytes: int = 0  # the model's weights as held by the driver's process (its shard under TP)


@dataclass
class SpecDecodeStats:
    """vLLM's counters: drafts verified, draft tokens proposed, drafts accepted (in total and by position)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)

    def observe(self, num_draft_tokens: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        if len(self.accepted_per_pos) < num_draft_tokens:
            self.accepted_per_pos.extend([0] * (num_draft_tokens - len(self.accepted_per_pos)))
        for pos in range(num_accepted):
            self.accepted_per_pos[pos] += 1

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens per verified draft, the bonus token included (1 + accepted / drafts)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    def since(self, earlier: SpecDecodeStats) -> SpecDecodeStats:
        """The counts added after the snapshot ``earlier``."""
        per_pos = [n - (earlier.accepted_per_pos[i] if i < len(earlier.accepted_per_pos) else 0)
                   for i, n in enumerate(self.accepted_per_pos)]
        return SpecDecodeStats(self.num_drafts - earlier.num_drafts, self.num_draft_tokens - earlier.num_draft_tokens,
                               self.num_accepted_tokens - earlier.num_accepted_tokens, per_pos)

    def log_line(self, elapsed_s: float) -> str:
        """vLLM's "SpecDecoding metrics" line for counts gathered over ``elapsed_s`` seconds."""
        rates = ", ".join(f"{n / self.num_drafts:.3f}" for n in self.accepted_per_pos) if self.num_drafts else ""
        draft_rate = self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0
        return (f"SpecDecoding metrics: Mean acceptance length: {self.mean_acceptance_length:.2f}, Accepted "
                f"throughput: {self.num_accepted_tokens / elapsed_s:.2f} tokens/s, Drafted throughput: "
                f"{self.num_draft_tokens / elapsed_s:.2f} tokens/s, Accepted: {self.num_accepted_tokens} tokens, "
                f"Drafted: {self.num_draft_tokens} tokens, Per-position acceptance rate: {rates}, Avg Draft "
                f"acceptance rate: {100 * draft_rate:.1f}%")
