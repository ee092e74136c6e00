"""Speculative decoding: the drafters (proposers) and the acceptance counters.

A decode step of a sequence with drafts ``d_1..d_k`` computes its last known token and the drafts in one forward of
the main model (the runner lays them out as ``1 + k`` rows); the sampler verifies them position by position (see
``dsv32.engine.sampler``). Only the accepted tokens' KV counts as computed: the slots of rejected drafts are simply
overwritten later.

After the verification the proposer drafts the next tokens from what this step computed. ``MTPProposer`` runs the
checkpoint's MTP layer over *every* row whose input turned out right (prompt chunks included, so its own latent and
indexer caches hold every computed position: ``h_p`` of the main model with the token ``t_{p+1}``), then drafts
``k`` tokens from the last one, rerunning the layer on its own output. ``OracleProposer`` drafts from known
continuations: with the true ones it measures the ceiling of the verify path (every draft accepted), with wrong
ones the cost of rejecting everything.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from dsv32.engine.executor.base import ModelHandle
from dsv32.engine.request import TokenSequence
from dsv32.engine.sampler import argmax
from dsv32.model.batch import ForwardBatch
from dsv32.model.cache import KVCache


@dataclass
class DraftInput:
    """One scheduled sequence after verification, as a drafter sees it."""

    seq: TokenSequence
    first_row: int  # main-batch row of position ``start`` (its first computed position this step)
    start: int
    next_token_ids: list[int]  # t_{p+1} for each computed position p = start.. whose input was right
    propose: bool  # it sampled this step: draft from its last position

    @property
    def num_rows(self) -> int:
        return len(self.next_token_ids)


class Proposer(ABC):
    """Drafts up to ``num_speculative_tokens`` tokens per sequence after each step."""

    def __init__(self, num_speculative_tokens: int) -> None:
        self.num_speculative_tokens = num_speculative_tokens

    @abstractmethod
    def propose(self, model: ModelHandle, kv_cache: KVCache, batch: ForwardBatch, hidden: torch.Tensor,
                inputs: list[DraftInput]) -> dict[TokenSequence, list[int]]:
        """Drafts for the inputs with ``propose`` set; ``batch``/``hidden`` are the main model's step."""


class MTPProposer(Proposer):
    """Greedy drafts from the checkpoint's MTP layer (module 0, rerun for k > 1, as vLLM and SGLang do)."""

    def propose(self, model: ModelHandle, kv_cache: KVCache, batch: ForwardBatch, hidden: torch.Tensor,
                inputs: list[DraftInput]) -> dict[TokenSequence, list[int]]:
        device = hidden.device
        bs = kv_cache.block_size
        rows: list[int] = []
        next_ids: list[int] = []
        query_start_loc = [0]
        for item in inputs:
            rows.extend(range(item.first_row, item.first_row + item.num_rows))
            next_ids.extend(item.next_token_ids)
            query_start_loc.append(len(rows))
        index = torch.tensor(rows, dtype=torch.long, device=device)
        # Every computed position whose input was right: fills the MTP layer's cache, prompt chunks included.
        mtp_batch = ForwardBatch(torch.tensor(next_ids, dtype=torch.long, device=device), batch.positions[index],
                                 query_start_loc, [item.start + item.num_rows for item in inputs],
                                 batch.block_tables, batch.slot_mapping[index], batch.dp_ranks)
        x = model.forward_mtp(mtp_batch, hidden[index], kv_cache)
        alive = [b for b, item in enumerate(inputs) if item.propose]
        if not alive:
            return {}
        x = x[torch.tensor([query_start_loc[b + 1] - 1 for b in alive], dtype=torch.long, device=device)]
        tokens = argmax(model.compute_mtp_logits(x))
        drafts = {inputs[b].seq: [t] for b, t in zip(alive, tokens.tolist(), strict=True)}
        # Deeper drafts: position q + depth takes the previous draft and the layer's own output at q + depth - 1.
        # Only slots the scheduler allocated may be written (it reserves k - 1 of them past the verified ones).
        for depth in range(1, self.num_speculative_tokens):
            positions = {b: inputs[b].start + inputs[b].num_rows - 1 + depth for b in alive}
            keep = [i for i, b in enumerate(alive) if positions[b] < len(inputs[b].seq.block_ids) * bs]
            if not keep:
                break
            alive = [alive[i] for i in keep]
            keep_index = torch.tensor(keep, dtype=torch.long, device=device)
            x, tokens = x[keep_index], tokens[keep_index]
            pos = [positions[b] for b in alive]
            tables = batch.block_tables[torch.tensor(alive, dtype=torch.long, device=device)]
            step = ForwardBatch(
                input_ids=tokens,
                positions=torch.tensor(pos, dtype=torch.long, device=device),
                query_start_loc=list(range(len(alive) + 1)),
                seq_lens=[p + 1 for p in pos],
                block_tables=tables,
                slot_mapping=torch.tensor([inputs[b].seq.block_ids[p // bs] * bs + p % bs
                                           for b, p in zip(alive, pos, strict=True)], dtype=torch.long, device=device),
                dp_ranks=[batch.dp_ranks[b] for b in alive] if batch.dp_ranks is not None else None,
            )
            x = model.forward_mtp(step, x, kv_cache)
            tokens = argmax(model.compute_mtp_logits(x))
            for b, t in zip(alive, tokens.tolist(), strict=True):
                drafts[inputs[b].seq].append(t)
        return drafts


class OracleProposer(Proposer):
    """Drafts from known continuations, keyed by prompt: the true ones give the verify path's ceiling, ``wrong``
    ones (each true token + 1) are all rejected. A sequence whose prompt it does not know gets no drafts."""

    def __init__(self, num_speculative_tokens: int, continuations: Mapping[tuple[int, ...], Sequence[int]],
                 vocab_size: int, wrong: bool = False) -> None:
        super().__init__(num_speculative_tokens)
        self.continuations = {tuple(k): list(v) for k, v in continuations.items()}
        self.vocab_size = vocab_size
        self.wrong = wrong

    def propose(self, model: ModelHandle, kv_cache: KVCache, batch: ForwardBatch, hidden: torch.Tensor,
                inputs: list[DraftInput]) -> dict[TokenSequence, list[int]]:
        drafts: dict[TokenSequence, list[int]] = {}
        for item in inputs:
            continuation = self.continuations.get(tuple(item.seq.prompt_token_ids))
            if not item.propose or continuation is None:
                continue
            num_known = item.start + 1 + item.num_rows
            done = num_known - item.seq.num_prompt_tokens
            proposal = continuation[done:done + self.num_speculative_tokens]
            drafts[item.seq] = [(t + 1) % self.vocab_size for t in proposal] if self.wrong else proposal
        return drafts
