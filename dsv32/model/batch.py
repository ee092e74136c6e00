"""``ForwardBatch``: the flat, unpadded varlen batch the model runs on (prefill chunks and decodes mixed)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    """``T`` tokens from ``B`` sequences, concatenated without padding.

    Sequence ``b`` owns tokens ``query_start_loc[b] : query_start_loc[b+1]``; they sit at absolute positions
    ``seq_lens[b] - q_len_b .. seq_lens[b] - 1`` of that sequence. Its cached context (earlier tokens, and the new
    ones once written) lives in the paged cache blocks ``block_tables[b]``; token ``t`` is written to cache slot
    ``slot_mapping[t]`` (= block_id * block_size + offset).
    """

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    query_start_loc: list[int]  # [B + 1]
    seq_lens: list[int]  # [B]: context length after this step
    block_tables: torch.Tensor  # [B, max_blocks] int64, padded with 0
    slot_mapping: torch.Tensor  # [T] int64

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def last_token_indices(self) -> torch.Tensor:
        """Index of each sequence's last token in the flat batch (where its next-token logits come from)."""
        return torch.tensor(self.query_start_loc[1:], dtype=torch.long) - 1


@dataclass
class SeqSpan:
    """One sequence's share of the flat batch: token rows ``[start, end)`` and its whole context's cache slots."""

    start: int
    end: int
    context_len: int
    slots: torch.Tensor  # [context_len] int64: cache slot of every context position 0..context_len-1
    positions: torch.Tensor  # [end - start] int64: absolute positions of its query tokens

    @property
    def num_queries(self) -> int:
        return self.end - self.start


@dataclass
class AttentionMetadata:
    """Per-forward attention bookkeeping shared by all layers, derived once from a ``ForwardBatch``.

    Decode sequences (one query token) are grouped into one padded batch ``[B_d, L_max]`` so a decode step runs
    as a few batched einsums; every other sequence (prefill chunks) is processed on its own.
    """

    slot_mapping: torch.Tensor  # [T]
    spans: list[SeqSpan]
    decode_seqs: list[int]
    prefill_seqs: list[int]
    decode_rows: torch.Tensor  # [B_d] token rows of the decode queries
    decode_slots: torch.Tensor  # [B_d, L_max] context slots, padded with slot 0
    decode_valid: torch.Tensor  # [B_d, L_max] bool: real context entries
    decode_positions: torch.Tensor  # [B_d]

    @classmethod
    def build(cls, batch: ForwardBatch, block_size: int) -> AttentionMetadata:
        device = batch.input_ids.device
        spans: list[SeqSpan] = []
        max_len = max(batch.seq_lens, default=0)
        offsets = torch.arange(max_len, device=device)
        for b, context_len in enumerate(batch.seq_lens):
            start, end = batch.query_start_loc[b], batch.query_start_loc[b + 1]
            pos = offsets[:context_len]
            slots = batch.block_tables[b, pos // block_size].long() * block_size + pos % block_size
            spans.append(SeqSpan(start, end, context_len, slots, batch.positions[start:end]))
        decode = [b for b, s in enumerate(spans) if s.num_queries == 1]
        prefill = [b for b, s in enumerate(spans) if s.num_queries > 1]
        l_max = max((spans[b].context_len for b in decode), default=0)
        decode_slots = torch.zeros(len(decode), l_max, dtype=torch.long, device=device)
        decode_valid = torch.zeros(len(decode), l_max, dtype=torch.bool, device=device)
        for i, b in enumerate(decode):
            n = spans[b].context_len
            decode_slots[i, :n] = spans[b].slots
            decode_valid[i, :n] = True
        rows = torch.tensor([spans[b].start for b in decode], dtype=torch.long, device=device)
        return cls(batch.slot_mapping, spans, decode, prefill, rows, decode_slots, decode_valid,
                   batch.positions[rows] if decode else rows)
