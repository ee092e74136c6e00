"""Batched sampling: next-token logits ``[B, V]`` and each row's ``SamplingParams`` -> token ids and logprobs.

The order follows vLLM v1. Logprobs are taken from the raw model logits (vLLM's default ``raw_logprobs``); then
min_tokens (ban EOS and stop ids), logit_bias, and the repetition / frequency / presence penalties edit the logits;
greedy rows take the argmax of those; sampled rows divide by their temperature, apply min_p, then top-k, then top-p,
and draw by inverse CDF: one uniform number per row (cheap on a CPU, unlike one random number per vocabulary entry).
Every step works on whole sub-batches of rows at once; rows that ask for nothing special skip it.

Speculative decoding verifies a drafted token per row with the same sampler, so every parameter keeps its meaning:
a greedy row takes its argmax as always (the draft is accepted iff it equals it); a sampled row keeps a greedy
draft ``d`` with probability ``p(d)`` under its final distribution ``p``, else draws from ``p`` with ``d`` removed
and renormalised, which gives each token exactly probability ``p`` (rejection sampling for a one-hot draft).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dsv32.engine.outputs import Logprob, PositionLogprobs
from dsv32.engine.sampling_params import SamplingParams

# Rows of logits turned into log-probabilities at once for prompt logprobs: bounds the float32 working memory.
PROMPT_LOGPROBS_CHUNK_ROWS = 256

# How many of the most likely tokens top-p looks among before it sorts a whole row (see _top_p_smallest_kept_logit).
TOP_P_CANDIDATES = 1024
# Tokens per block of the two-level inverse CDF (sampling): ~sqrt(vocab), so both levels are short.
INVERSE_CDF_BLOCK = 512


@dataclass
class SamplingRequestState:
    """What the sampler needs to know about one row of the batch.

    ``generator`` is the request's own random stream (see ``make_generator``), so a seeded request draws the same
    numbers whatever else is in the batch; None draws from the sampler's shared stream.
    """

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: torch.Generator | None = None


def make_generator(seed: int | None) -> torch.Generator | None:
    """A request's own random stream for ``SamplingParams.seed`` (None when the request has no seed).

    Keep it for the request's whole life: it advances once per sampled token, so the tokens depend only on the
    seed and the logits. It lives on the CPU whatever the logits' device: the sampler draws one number per row.
    (For ``n > 1`` vLLM gives completion ``i`` the seed ``seed + i``.)
    """
    if seed is None:
        return None
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


@dataclass
class TokenLogprobs:
    """Logprob and rank (1 = most likely) of one chosen token, and the top alternatives at its position."""

    token_id: int
    logprob: float
    rank: int
    top_token_ids: list[int]
    top_logprobs: list[float]

    def to_position_logprobs(self) -> PositionLogprobs:
        """vLLM's ``{token_id: Logprob}`` for this position: the chosen token first, then the alternatives in rank
        order (the chosen one appears once). ``decoded_token`` stays empty: the engine does not decode strings, the
        reader of the output does (``dsv32.engine.outputs.logprob_token_text``)."""
        position = {self.token_id: Logprob(self.logprob, self.rank)}
        for rank, (token_id, logprob) in enumerate(zip(self.top_token_ids, self.top_logprobs, strict=True), start=1):
            if token_id not in position:
                position[token_id] = Logprob(logprob, rank)
        return position


@dataclass
class SamplerOutput:
    """``token_ids``: the next token of each row (int64, on the logits' device). ``logprobs``: per row, None unless
    that row's params asked for ``logprobs``."""

    token_ids: torch.Tensor
    logprobs: list[TokenLogprobs | None]


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, num_top: Sequence[int]) -> list[TokenLogprobs]:
    """Raw logprob and rank of ``token_ids[i]`` under ``logits[i]``, plus the ``num_top[i]`` most likely tokens."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, token_ids.view(-1, 1))
    # vLLM's rank: how many tokens are at least as likely as the chosen one (ties count against it).
    ranks = (logprobs >= chosen).sum(dim=-1)
    max_top = max(num_top, default=0)
    if max_top > 0:
        top_logprobs, top_ids = logprobs.topk(max_top, dim=-1)
        top_ids_rows, top_logprobs_rows = top_ids.tolist(), top_logprobs.tolist()
    else:
        top_ids_rows = top_logprobs_rows = [[] for _ in num_top]
    return [
        TokenLogprobs(token_id, logprob, rank, ids[:count], values[:count])
        for token_id, logprob, rank, ids, values, count in zip(
            token_ids.tolist(), chosen.view(-1).tolist(), ranks.tolist(), top_ids_rows, top_logprobs_rows, num_top,
            strict=True,
        )
    ]


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax ``[B]`` of ``[B, V]`` logits: the first maximum, as ``Tensor.argmax`` (NaN counting as the
    largest). On a CPU a row's ``argmax`` / ``max(dim)`` is one scalar loop (70 us for 129280 fp32 logits, 200 us
    for ``argmax``), while ``amax`` is vectorised: so the row is cut into blocks, the block holding the first maximum
    is found from the blocks' ``amax`` and only that block is scanned (22 us a row; 8 rows 0.18 against 0.30 ms)."""
    rows, vocab = logits.shape
    block = _argmax_block(vocab)
    if block is None or not logits.is_contiguous() or logits.device.type != "cpu":
        return logits.max(dim=-1).indices
    blocks = logits.view(rows, vocab // block, block)
    first_block = blocks.amax(-1).argmax(-1)  # the first block whose maximum is the row's (amax propagates NaN)
    if rows == 1:  # a batch-1 decode step's: indexing by a Python int takes fewer ops than the gather
        b = int(first_block)
        return (blocks[0, b].argmax() + b * block).view(1)
    within = blocks.gather(1, first_block[:, None, None].expand(-1, 1, block))[:, 0].argmax(-1)
    return first_block * block + within


@functools.cache
def _argmax_block(vocab: int) -> int | None:
    """The block length ``argmax`` cuts a row of ``vocab`` logits into: a divisor near the square root's scale
    (~1K; 1010 for the V3 vocabulary), None when ``vocab`` has none worth using."""
    divisors = [d for d in range(256, 4097) if vocab % d == 0 and vocab // d >= 16]
    return min(divisors, key=lambda d: abs(d - 1024)) if divisors else None


def reads_output_tokens(params: SamplingParams) -> bool:
    """Whether the sampler looks at a row's output tokens: their count (min_tokens) or their ids (the penalties).
    A row without either may pass no output tokens at all."""
    return (params.min_tokens > 0 or params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0
            or params.presence_penalty != 0.0)


def _edits_logits(row: SamplingRequestState) -> bool:
    """Whether min_tokens, logit_bias or a penalty changes this row's logits this step."""
    p = row.params
    return (bool(p.logit_bias) or len(row.output_token_ids) < p.min_tokens or p.repetition_penalty != 1.0
            or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0)


def _rows_tensor(rows: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


def take_rows(tensor: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``tensor[rows]``, without copying a full-vocabulary tensor when ``rows`` are all of them, in order (the common
    case: every row of the batch)."""
    if rows == list(range(tensor.shape[0])):
        return tensor
    return tensor[_rows_tensor(rows, tensor.device)]


def _padded(sequences: list[Sequence[int]], pad: int, device: torch.device) -> torch.Tensor:
    """Token id lists as one ``[len(sequences), longest]`` tensor, padded with ``pad``."""
    out = torch.full((len(sequences), max((len(s) for s in sequences), default=0)), pad, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        out[row, :len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
    return out.to(device)


def _token_counts(sequences: list[Sequence[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """How often each vocabulary id occurs in each sequence: ``[len(sequences), vocab_size]`` float32."""
    ids = _padded(sequences, vocab_size, device)  # the padding id lands in an extra column that is dropped
    counts = torch.zeros(len(sequences), vocab_size + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab_size]


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).view(-1, 1)


class Sampler:
    """Picks the next token of every row of a batch; see the module docstring for the order of operations."""

    def __init__(self, seed: int | None = None) -> None:
        # Rows without their own seed share this stream, seeded from the engine seed when there is one.
        self._shared_generator = torch.Generator()
        if seed is None:
            self._shared_generator.seed()
        else:
            self._shared_generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRequestState], eos_token_id: int,
                 draft_token_ids: Sequence[int | None] | None = None) -> SamplerOutput:
        """One token per row. ``draft_token_ids[i]`` (speculative decoding): the token a greedy drafter proposed
        for row ``i`` (None: no draft); the draft is accepted iff the returned token equals it."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"Sampler expects logits of shape [{len(rows)}, vocab] (one row per request), "
                             f"got {tuple(logits.shape)}.")
        if all(row.params.greedy and row.params.logprobs is None and not _edits_logits(row) for row in rows):
            # The common case, one batched op: the argmax of the raw logits.
            return SamplerOutput(token_ids=argmax(logits), logprobs=[None] * len(rows))
        drafts = list(draft_token_ids) if draft_token_ids is not None else [None] * len(rows)
        raw_logits = logits
        logits = self.processed_logits(logits, rows, eos_token_id)
        # The argmax of every row (cheaper than gathering the greedy ones first); sampled rows are overwritten below.
        if any(row.params.greedy for row in rows):
            token_ids = argmax(logits)
        else:
            token_ids = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
        if sampled:
            sampled_rows = _rows_tensor(sampled, logits.device)
            token_ids[sampled_rows] = self._sample(take_rows(logits, sampled), [rows[i] for i in sampled],
                                                   [drafts[i] for i in sampled])

        wanted = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
        logprobs: list[TokenLogprobs | None] = [None] * len(rows)
        if wanted:
            wanted_rows = _rows_tensor(wanted, logits.device)
            computed = token_logprobs(raw_logits[wanted_rows], token_ids[wanted_rows],
                                      [rows[i].params.logprobs or 0 for i in wanted])
            for i, row_logprobs in zip(wanted, computed, strict=True):
                logprobs[i] = row_logprobs
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs)

    def processed_logits(self, logits: torch.Tensor, rows: Sequence[SamplingRequestState],
                         eos_token_id: int) -> torch.Tensor:
        """The float32 logits after min_tokens, logit_bias and penalties: what greedy rows take the argmax of, and
        what sampled rows' temperature, min_p, top-k and top-p then work on."""
        # Each edit returns a new tensor only when some row needs it: the caller's logits stay untouched.
        logits = self._ban_stop_tokens_before_min_tokens(logits.float(), rows, eos_token_id)
        logits = self._apply_logit_bias(logits, rows)
        return self._apply_penalties(logits, rows)

    @staticmethod
    def _ban_stop_tokens_before_min_tokens(logits: torch.Tensor, rows: Sequence[SamplingRequestState],
                                           eos_token_id: int) -> torch.Tensor:
        # As vLLM: EOS is banned even with ignore_eos (which only stops EOS from ending the request).
        batch_rows: list[int] = []
        banned: list[int] = []
        for i, row in enumerate(rows):
            if len(row.output_token_ids) < row.params.min_tokens:
                stop_ids = {eos_token_id, *row.params.stop_token_ids}
                batch_rows.extend([i] * len(stop_ids))
                banned.extend(stop_ids)
        if not banned:
            return logits
        index = (_rows_tensor(batch_rows, logits.device), _rows_tensor(banned, logits.device))
        return logits.index_put(index, torch.tensor(float("-inf"), device=logits.device))

    @staticmethod
    def _apply_logit_bias(logits: torch.Tensor, rows: Sequence[SamplingRequestState]) -> torch.Tensor:
        batch_rows: list[int] = []
        token_ids: list[int] = []
        biases: list[float] = []
        for i, row in enumerate(rows):
            for token_id, bias in (row.params.logit_bias or {}).items():
                batch_rows.append(i)
                token_ids.append(int(token_id))
                biases.append(float(bias))
        if not biases:
            return logits
        index = (_rows_tensor(batch_rows, logits.device), _rows_tensor(token_ids, logits.device))
        return logits.index_put(index, torch.tensor(biases, dtype=logits.dtype, device=logits.device), accumulate=True)

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRequestState]) -> torch.Tensor:
        """Repetition penalty over prompt + output tokens (HF/vLLM: positive logits divided, negative multiplied);
        OpenAI frequency (per occurrence) and presence (once) penalties over output tokens, subtracted."""
        penalized = [i for i, row in enumerate(rows) if row.params.repetition_penalty != 1.0
                     or row.params.frequency_penalty != 0.0 or row.params.presence_penalty != 0.0]
        if not penalized:
            return logits
        device, vocab_size = logits.device, logits.shape[1]
        params = [rows[i].params for i in penalized]
        batch_rows = _rows_tensor(penalized, device)
        penalized_logits = logits[batch_rows]
        output_counts = _token_counts([rows[i].output_token_ids for i in penalized], vocab_size, device)
        if any(p.repetition_penalty != 1.0 for p in params):
            prompt_counts = _token_counts([rows[i].prompt_token_ids for i in penalized], vocab_size, device)
            seen = (prompt_counts > 0) | (output_counts > 0)
            repetition = _column([p.repetition_penalty for p in params], device)
            repeated = torch.where(penalized_logits > 0, penalized_logits / repetition, penalized_logits * repetition)
            penalized_logits = torch.where(seen, repeated, penalized_logits)
        penalized_logits -= _column([p.frequency_penalty for p in params], device) * output_counts
        penalized_logits -= _column([p.presence_penalty for p in params], device) * (output_counts > 0)
        return logits.index_copy(0, batch_rows, penalized_logits)

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRequestState], drafts: list[int | None]) -> torch.Tensor:
        """Draw one token per row of ``logits`` (the non-greedy rows, in order), verifying ``drafts``."""
        device, vocab_size = logits.device, logits.shape[1]
        params = [row.params for row in rows]
        logits = logits / _column([p.temperature for p in params], device)

        if any(p.min_p > 0.0 for p in params):
            probs = torch.softmax(logits, dim=-1)
            threshold = probs.amax(dim=-1, keepdim=True) * _column([p.min_p for p in params], device)
            logits = logits.masked_fill(probs < threshold, float("-inf"))

        top_k = [p.top_k if 0 < p.top_k < vocab_size else 0 for p in params]
        if any(top_k):
            top_values = logits.topk(max(top_k), dim=-1).values
            kth_index = torch.tensor([max(k, 1) - 1 for k in top_k], dtype=torch.long, device=device).view(-1, 1)
            kth_value = top_values.gather(1, kth_index)
            no_top_k = torch.tensor([k == 0 for k in top_k], device=device).view(-1, 1)
            kth_value = kth_value.masked_fill(no_top_k, float("-inf"))
            logits = logits.masked_fill(logits < kth_value, float("-inf"))

        top_p_rows = [i for i, p in enumerate(params) if p.top_p < 1.0]
        if top_p_rows:
            index = _rows_tensor(top_p_rows, device)
            nucleus_logits = logits[index]
            smallest_kept = _top_p_smallest_kept_logit(nucleus_logits, _column([params[i].top_p for i in top_p_rows],
                                                                               device))
            logits = logits.index_copy(0, index, nucleus_logits.masked_fill(nucleus_logits < smallest_kept,
                                                                            float("-inf")))

        probs = torch.softmax(logits, dim=-1)
        drafted = [i for i, d in enumerate(drafts) if d is not None]
        accepted = torch.zeros(len(rows), dtype=torch.bool, device=device)
        if drafted:
            # Rejection sampling of a greedy draft d: keep it with probability p(d), else draw from p without d.
            index = _rows_tensor(drafted, device)
            draft_ids = _rows_tensor([drafts[i] for i in drafted], device)
            p_draft = probs[index, draft_ids]
            accepted[index] = self._uniform([rows[i] for i in drafted]).to(device).view(-1) < p_draft
            rejected = ~accepted[index]
            probs = probs.index_put((index[rejected], draft_ids[rejected]), torch.zeros((), device=device))
        token_ids = torch.empty(len(rows), dtype=torch.long, device=device)
        if drafted:
            token_ids[index] = draft_ids
        draw = (~accepted).nonzero().view(-1).tolist()
        if draw:
            token_ids[_rows_tensor(draw, device)] = self._inverse_cdf(take_rows(probs, draw), [rows[i] for i in draw])
        return token_ids

    def _inverse_cdf(self, probs: torch.Tensor, rows: list[SamplingRequestState]) -> torch.Tensor:
        """One token per row of (unnormalised) ``probs``, by inverse CDF on one uniform number per row.

        In two levels, as a full-vocabulary cumulative sum (one sequential pass over 129k values per row) is slow on
        a CPU: the CDF of ``INVERSE_CDF_BLOCK``-token blocks picks the block, then the CDF inside that block alone
        picks the token. Each target is kept strictly below the mass it is searched in, so the token found always
        has nonzero probability."""
        uniform = self._uniform(rows).to(probs.device)
        batch, vocab = probs.shape
        full = vocab - vocab % INVERSE_CDF_BLOCK
        block_mass = probs[:, :full].reshape(batch, -1, INVERSE_CDF_BLOCK).sum(dim=-1)
        if full < vocab:
            block_mass = torch.cat((block_mass, probs[:, full:].sum(dim=-1, keepdim=True)), dim=1)
        cumulative = block_mass.cumsum(dim=-1)
        target = _below(uniform * cumulative[:, -1:], cumulative[:, -1:])
        block = torch.searchsorted(cumulative, target, right=True).clamp_(max=cumulative.shape[1] - 1)
        before = torch.where(block > 0, cumulative.gather(1, (block - 1).clamp(min=0)), 0.0)
        offsets = block * INVERSE_CDF_BLOCK + torch.arange(INVERSE_CDF_BLOCK, device=probs.device)
        inside = probs.gather(1, offsets.clamp(max=vocab - 1)).masked_fill(offsets >= vocab, 0.0).cumsum(dim=-1)
        local = _below(target - before, inside[:, -1:])
        return (block * INVERSE_CDF_BLOCK + torch.searchsorted(inside, local, right=True)).view(-1)

    def _uniform(self, rows: list[SamplingRequestState]) -> torch.Tensor:
        """One uniform number per row ``[len(rows), 1]`` (on the CPU), from the row's own generator if it has one."""
        uniform = torch.empty(len(rows), 1)
        shared = [i for i, row in enumerate(rows) if row.generator is None]
        if shared:
            uniform[shared] = torch.rand(len(shared), 1, generator=self._shared_generator)
        for i, row in enumerate(rows):
            if row.generator is not None:
                uniform[i] = torch.rand(1, generator=row.generator)
        return uniform


def _below(target: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``target`` clamped into ``[0, total)``: the first cumulative value above it then belongs to a token (or
    block) with nonzero mass."""
    return torch.minimum(target.clamp(min=0.0), torch.nextafter(total, torch.zeros_like(total)))


def _top_p_smallest_kept_logit(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per row, the smallest logit in the top-p nucleus: the fewest most likely tokens whose mass reaches ``top_p``.

    Sorting a whole 129k vocabulary is slow on a CPU, so the nucleus is first looked for among the
    ``TOP_P_CANDIDATES`` best tokens, which almost always hold the mass of a real model's distribution; only rows
    where they fall short are sorted in full.
    """
    log_total = torch.logsumexp(logits, dim=-1, keepdim=True)
    candidates = logits.topk(min(TOP_P_CANDIDATES, logits.shape[1]), dim=-1).values
    smallest_kept = _nucleus_boundary(candidates, log_total, top_p)
    short = ((candidates - log_total).exp().sum(dim=-1, keepdim=True) < top_p).view(-1).nonzero().view(-1)
    if short.numel() and candidates.shape[1] < logits.shape[1]:
        full = logits[short].sort(dim=-1, descending=True).values
        smallest_kept[short] = _nucleus_boundary(full, log_total[short], top_p[short])
    return smallest_kept


def _nucleus_boundary(descending_logits: torch.Tensor, log_total: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The last logit kept by top-p among logits sorted in descending order (normalised by ``log_total``): a token
    is dropped once the tokens ranked above it already hold ``top_p``, so the best token always stays."""
    probs = (descending_logits - log_total).exp()
    mass_above = probs.cumsum(dim=-1) - probs
    kept = (mass_above < top_p).sum(dim=-1, keepdim=True).clamp(min=1)
    return descending_logits.gather(1, kept - 1)
