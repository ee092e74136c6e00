"""The model runner: sizes and owns the KV cache, turns a scheduled step into a ``ForwardBatch``, runs the model,
and samples (plus prompt logprobs for the prompt positions computed in this step).

The scheduler decides *which* tokens to compute; the runner only lays them out (flat varlen batch, absolute
positions, block tables, one cache slot per token) and reads back the rows that need logits: each sequence's last
row when it has caught up with its known tokens (it samples the next one), and the prompt rows of sequences that
asked for ``prompt_logprobs``, in the chunk where they are produced.

With speculative decoding a caught-up sequence also carries drafted tokens: its last known token and the drafts are
``1 + k`` rows, each with logits. The sampler runs over them position by position (all sequences' j-th positions
in one call), each time with the tokens accepted before it as the sequence's output, so penalties, min_tokens and
every other parameter see exactly what they would without speculation; it stops at the first rejected draft. Then
the proposer drafts the next tokens (see ``dsv32.engine.spec_decode``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

from dsv32.config import EngineConfig, ModelConfig
from dsv32.engine.executor.base import ModelHandle
from dsv32.engine.request import TokenSequence
from dsv32.engine.sampler import (
    PROMPT_LOGPROBS_CHUNK_ROWS,
    Sampler,
    SamplingRequestState,
    TokenLogprobs,
    reads_output_tokens,
    take_rows,
    token_logprobs,
)
from dsv32.engine.scheduler import ScheduledSeq
from dsv32.engine.spec_decode import DraftInput, Proposer
from dsv32.engine.structured_output import StructuredOutputManager
from dsv32.model.batch import ForwardBatch

logger = logging.getLogger(__name__)

GiB = 1 << 30
# Without a budget on CPU: 1 GiB, or less when max_num_seqs full-length sequences need less.
DEFAULT_CPU_KV_CACHE_BYTES = GiB


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but no CUDA device is available")
    return torch.device(device)


@dataclass(frozen=True)
class KVCachePlan:
    """How many blocks the cache has and the longest sequence the engine accepts."""

    num_blocks: int
    block_size: int
    bytes_per_token: int
    max_model_len: int

    @property
    def max_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_bytes(self) -> int:
        return self.max_tokens * self.bytes_per_token


def plan_kv_cache(engine_config: EngineConfig, model_config: ModelConfig, bytes_per_token: int,
                  budget_bytes: int | None) -> KVCachePlan:
    """Blocks from the memory budget (``kv_cache_memory`` wins over ``budget_bytes``; ``None`` = the CPU default)
    and ``max_model_len`` (the user's, checked, or the shorter of the model's context and what the cache holds)."""
    block_size = engine_config.block_size
    requested = engine_config.max_model_len
    max_position = model_config.max_position_embeddings
    if requested is not None and requested > max_position:
        raise ValueError(f"User-specified max_model_len ({requested}) is greater than the derived max_model_len "
                         f"(max_position_embeddings={max_position} in the model's config.json).")
    if engine_config.kv_cache_memory is not None:
        budget = engine_config.kv_cache_memory
    elif budget_bytes is not None:
        budget = budget_bytes
    else:
        blocks_per_seq = math.ceil((requested or max_position) / block_size)
        needed = engine_config.max_num_seqs * blocks_per_seq * block_size * bytes_per_token
        budget = min(DEFAULT_CPU_KV_CACHE_BYTES, needed)
    block_bytes = bytes_per_token * block_size
    num_blocks = max(0, budget) // block_bytes
    if num_blocks < 1:
        raise ValueError(f"No memory left for the KV cache: one block of {block_size} tokens needs {block_bytes} "
                         f"bytes, the budget is {budget} bytes. Increase kv_cache_memory or gpu_memory_utilization.")
    capacity = num_blocks * block_size
    if requested is not None and requested > capacity:
        raise ValueError(
            f"To serve at least one request with the model's max seq len ({requested}), "
            f"({requested * bytes_per_token / GiB:.2f} GiB KV cache is needed, which is larger than the available KV "
            f"cache memory ({budget / GiB:.2f} GiB). Based on the available memory, the estimated maximum model "
            f"length is {capacity}. Try increasing `gpu_memory_utilization` (or `kv_cache_memory`) or decreasing "
            f"`max_model_len` when initializing the engine.")
    return KVCachePlan(num_blocks, block_size, bytes_per_token, requested or min(max_position, capacity))


@dataclass
class SampledToken:
    seq: TokenSequence
    token_id: int
    logprobs: TokenLogprobs | None


@dataclass
class StepResult:
    # The new tokens, in order; with speculation a sequence has its accepted drafts and one more token.
    sampled: list[SampledToken]
    # Logprobs of the next prompt tokens still unreported whose predecessors were computed this step, in order.
    prompt_logprobs: list[tuple[TokenSequence, list[TokenLogprobs]]]
    # Speculation: drafts accepted per sequence that verified some, and the next drafts.
    num_accepted: dict[TokenSequence, int]
    drafts: dict[TokenSequence, list[int]]


@dataclass
class _SampleRows:
    """A sequence that samples this step: logits rows ``first_row ..`` for its last known token and its drafts."""

    seq: TokenSequence
    first_row: int
    draft_token_ids: list[int]


@dataclass
class _PromptLogprobRows:
    seq: TokenSequence
    first_row: int  # flat-batch row of the first position whose next token is a prompt token
    targets: list[int]  # the prompt tokens those rows predict


class ModelRunner:
    """Owns the model's KV-cache tensors and runs one scheduled step at a time."""

    def __init__(self, model: ModelHandle, engine_config: EngineConfig, device: torch.device,
                 eos_token_id: int, structured_output: StructuredOutputManager | None = None,
                 proposer: Proposer | None = None) -> None:
        """``structured_output`` masks the logits of its constrained rows before sampling; ``proposer`` drafts
        tokens for speculative decoding."""
        self.model = model
        self.structured_output = structured_output
        self.proposer = proposer
        self.engine_config = engine_config
        self.device = device
        self.eos_token_id = eos_token_id
        self.block_size = engine_config.block_size
        self.sampler = Sampler(seed=engine_config.seed)
        bytes_per_token = model.kv_cache_bytes_per_token(engine_config.kv_cache_dtype)
        budget = self._cuda_kv_budget() if device.type == "cuda" and engine_config.kv_cache_memory is None else None
        self.plan = plan_kv_cache(engine_config, model.config, bytes_per_token, budget)
        self.kv_cache = model.allocate_kv_cache(self.plan.num_blocks, self.block_size, engine_config.kv_cache_dtype)
        logger.info("KV cache (%s): %d blocks of %d tokens, %d max tokens in cache (%.2f GiB, %d bytes/token); "
                    "max_model_len %d; maximum concurrency for %d tokens per request: %.2fx",
                    engine_config.kv_cache_dtype, self.plan.num_blocks, self.block_size, self.plan.max_tokens,
                    self.plan.num_bytes / GiB, bytes_per_token, self.plan.max_model_len, self.plan.max_model_len,
                    self.plan.max_tokens / self.plan.max_model_len)
        start = time.perf_counter()
        sizes = model.capture_decode_graphs(self.kv_cache)
        if sizes:
            logger.info("decode graphs compiled for batch sizes %s in %.1f s (--enforce-eager runs eagerly)",
                        list(sizes), time.perf_counter() - start)

    @property
    def max_model_len(self) -> int:
        return self.plan.max_model_len

    @property
    def num_blocks(self) -> int:
        return self.plan.num_blocks

    # ---- one step -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSeq]) -> StepResult:
        batch, sample_rows, prompt_rows = self._prepare(scheduled)
        hidden = self.model(batch, self.kv_cache)
        accepted_tokens = self._sample(hidden, sample_rows)
        sampled = [token for tokens in accepted_tokens.values() for token in tokens]
        num_accepted = {seq: len(tokens) - 1 for seq, tokens in accepted_tokens.items()}
        prompt_logprobs = [(rows.seq, self._prompt_logprobs(hidden, rows)) for rows in prompt_rows]
        drafts: dict[TokenSequence, list[int]] = {}
        if self.proposer is not None:
            inputs = self._draft_inputs(batch, scheduled, accepted_tokens)
            drafts = self.proposer.propose(self.model, self.kv_cache, batch, hidden, inputs)
        return StepResult(sampled, prompt_logprobs, num_accepted, drafts)

    def _sample(self, hidden: torch.Tensor, sample_rows: list[_SampleRows]) -> dict[TokenSequence, list[SampledToken]]:
        """Each sampling sequence's new tokens: its accepted drafts, then the token drawn where the first draft was
        rejected (or after the last). Position ``j`` of every sequence still verifying is sampled in one call."""
        if not sample_rows:
            return {}
        offsets = [0]
        for item in sample_rows:
            offsets.append(offsets[-1] + 1 + len(item.draft_token_ids))
        rows = [item.first_row + j for item in sample_rows for j in range(1 + len(item.draft_token_ids))]
        # Filled on the CPU while an accelerator still runs the forward pass. Constrained sequences get no drafts
        # (see the scheduler), so they are sampled at position 0 only, where their matcher's state applies.
        grammar_mask = (self.structured_output.fill_bitmask([item.seq for item in sample_rows])
                        if self.structured_output else None)
        every_row = rows == list(range(hidden.shape[0]))  # decodes without drafts: no gather
        logits = self.model.compute_logits(hidden if every_row else hidden[torch.tensor(rows, device=self.device)])
        if grammar_mask is not None:
            position0 = torch.tensor(offsets[:-1], device=self.device)
            logits[position0] = grammar_mask.apply(logits[position0])
        new_tokens: dict[TokenSequence, list[SampledToken]] = {item.seq: [] for item in sample_rows}
        verifying = list(range(len(sample_rows)))
        position = 0
        while verifying:
            items = [sample_rows[i] for i in verifying]
            states = [SamplingRequestState(s.seq.sampling_params, s.seq.prompt_token_ids,
                                           self._output_tokens(s.seq, new_tokens[s.seq]), s.seq.generator)
                      for s in items]
            drafts = [s.draft_token_ids[position] if position < len(s.draft_token_ids) else None for s in items]
            out = self.sampler(take_rows(logits, [offsets[i] + position for i in verifying]), states,
                               self.eos_token_id, drafts)
            still: list[int] = []
            for i, item, token_id, logprobs, draft in zip(verifying, items, out.token_ids.tolist(), out.logprobs,
                                                           drafts, strict=True):
                new_tokens[item.seq].append(SampledToken(item.seq, token_id, logprobs))
                if draft is not None and token_id == draft:
                    still.append(i)
            verifying = still
            position += 1
        return new_tokens

    @staticmethod
    def _output_tokens(seq: TokenSequence, new_tokens: list[SampledToken]) -> list[int]:
        """The output tokens the sampler sees for ``seq``: those generated so far plus the ones accepted earlier in
        this step (speculative decoding). A copy, made only for the rows whose params read them (min_tokens,
        penalties): the others, nearly every row, would pay for copying their whole output every step."""
        if not reads_output_tokens(seq.sampling_params):
            return []
        return seq.output_token_ids + [t.token_id for t in new_tokens]

    @staticmethod
    def _draft_inputs(batch: ForwardBatch, scheduled: list[ScheduledSeq],
                      accepted_tokens: dict[TokenSequence, list[SampledToken]]) -> list[DraftInput]:
        """Per scheduled sequence, the rows whose input tokens were right and the token after each."""
        inputs = []
        for b, item in enumerate(scheduled):
            seq, start = item.seq, item.seq.num_computed_tokens
            new = [t.token_id for t in accepted_tokens.get(seq, [])]
            next_ids = seq.token_ids[start + 1:start + item.num_new_tokens] + new
            if not new:  # a prompt chunk that has not caught up: its next token is a known prompt token
                next_ids.append(seq.token_ids[start + item.num_new_tokens])
            inputs.append(DraftInput(seq, batch.query_start_loc[b], start, next_ids, propose=bool(new)))
        return inputs

    def _prepare(self, scheduled: list[ScheduledSeq]
                 ) -> tuple[ForwardBatch, list[_SampleRows], list[_PromptLogprobRows]]:
        """Lay the step out as a flat batch. Python touches each sequence once; positions and cache slots of every
        token are computed as tensors."""
        bs = self.block_size
        input_ids: list[int] = []
        starts: list[int] = []
        query_start_loc = [0]
        seq_lens: list[int] = []
        sample_rows: list[_SampleRows] = []
        prompt_rows: list[_PromptLogprobRows] = []
        for item in scheduled:
            seq, start = item.seq, item.seq.num_computed_tokens
            end = start + item.num_new_tokens
            row0 = len(input_ids)
            input_ids.extend(seq.token_ids[start:end])
            input_ids.extend(item.spec_token_ids)
            end_with_drafts = end + len(item.spec_token_ids)
            starts.append(start)
            query_start_loc.append(len(input_ids))
            seq_lens.append(end_with_drafts)
            if end == seq.num_tokens:  # caught up: its last row predicts the next token (and verifies the drafts)
                sample_rows.append(_SampleRows(seq, row0 + end - 1 - start, item.spec_token_ids))
            # The row at position p predicts prompt token p + 1. Tokens already reported (before a preemption made
            # this sequence recompute its prompt) are skipped.
            if seq.needs_prompt_logprobs:
                first = max(start, len(seq.prompt_logprobs) - 1)
                last = min(end, seq.num_prompt_tokens - 1)
                if first < last:
                    targets = seq.prompt_token_ids[first + 1:last + 1]
                    prompt_rows.append(_PromptLogprobRows(seq, row0 + first - start, targets))
        max_blocks = max(len(item.seq.block_ids) for item in scheduled)
        tables = torch.tensor([item.seq.block_ids + [0] * (max_blocks - len(item.seq.block_ids))
                               for item in scheduled], dtype=torch.long)
        num_tokens = len(input_ids)
        if num_tokens == len(scheduled):  # one token per sequence (decodes): a few ints, cheaper without tensor ops
            positions = torch.tensor(starts, dtype=torch.long)
            slot_mapping = torch.tensor([item.seq.block_ids[p // bs] * bs + p % bs
                                         for item, p in zip(scheduled, starts, strict=True)], dtype=torch.long)
        else:
            q_lens = torch.tensor(query_start_loc[1:]) - torch.tensor(query_start_loc[:-1])
            seq_of_token = torch.repeat_interleave(torch.arange(len(scheduled)), q_lens)
            first_row = torch.tensor(query_start_loc[:-1]) - torch.tensor(starts)  # row of position 0, per sequence
            positions = torch.arange(num_tokens) - first_row[seq_of_token]
            slot_mapping = tables[seq_of_token, positions // bs] * bs + positions % bs
        device = self.device
        batch = ForwardBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.long, device=device),
            positions=positions.to(device),
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            block_tables=tables.to(device),
            slot_mapping=slot_mapping.to(device),
            dp_ranks=[item.seq.dp_rank for item in scheduled] if self.engine_config.data_parallel_size > 1 else None,
        )
        return batch, sample_rows, prompt_rows

    def _prompt_logprobs(self, hidden: torch.Tensor, rows: _PromptLogprobRows) -> list[TokenLogprobs]:
        num_top = rows.seq.sampling_params.prompt_logprobs or 0
        targets = torch.tensor(rows.targets, dtype=torch.long, device=self.device)
        result: list[TokenLogprobs] = []
        # Full-vocabulary float32 logits of a whole chunk would be large: take them a slice at a time.
        for lo in range(0, len(rows.targets), PROMPT_LOGPROBS_CHUNK_ROWS):
            hi = min(lo + PROMPT_LOGPROBS_CHUNK_ROWS, len(rows.targets))
            logits = self.model.compute_logits(hidden[rows.first_row + lo:rows.first_row + hi])
            result.extend(token_logprobs(logits, targets[lo:hi], [num_top] * (hi - lo)))
        return result

    # ---- memory -------------------------------------------------------------------------------------
    def _cuda_kv_budget(self) -> int:
        """Bytes left for the KV cache on the GPU: ``gpu_memory_utilization`` of the device, minus the weights, the
        peak activations of a full-budget step (measured with a throwaway cache) and memory used by others."""
        cfg = self.engine_config
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        num_tokens = cfg.max_num_batched_tokens
        num_blocks = math.ceil(num_tokens / self.block_size)
        kv = self.model.allocate_kv_cache(num_blocks, self.block_size, cfg.kv_cache_dtype)
        dev = self.device
        batch = ForwardBatch(
            input_ids=torch.zeros(num_tokens, dtype=torch.long, device=dev),
            positions=torch.arange(num_tokens, device=dev),
            query_start_loc=[0, num_tokens],
            seq_lens=[num_tokens],
            block_tables=torch.arange(num_blocks, device=dev).view(1, -1),
            slot_mapping=torch.arange(num_tokens, device=dev),
        )
        with torch.inference_mode():
            hidden = self.model(batch, kv)
            rows = min(num_tokens, max(cfg.max_num_seqs, PROMPT_LOGPROBS_CHUNK_ROWS))
            torch.log_softmax(self.model.compute_logits(hidden[:rows]), dim=-1)
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        del kv, hidden, batch
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(dev)
        used_by_others = total - free - torch.cuda.memory_reserved(dev)
        budget = int(total * cfg.gpu_memory_utilization) - peak - used_by_others
        logger.info("GPU memory: total %.2f GiB, peak use of a %d-token step %.2f GiB, used by other processes "
                    "%.2f GiB -> %.2f GiB for the KV cache", total / GiB, num_tokens, peak / GiB,
                    used_by_others / GiB, budget / GiB)
        return budget
