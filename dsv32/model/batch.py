"""``ForwardBatch``: the flat, unpadded varlen batch the model runs on (prefill chunks and decodes mixed)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv32.kernels.attention import AttentionMetadata


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
    # Data-parallel attention: the rank that holds each sequence's cache (its block ids are that rank's).
    dp_ranks: list[int] | None = None
    # Data-parallel attention, in a rank's sub-batch (``for_rank``): how many tokens every rank runs in this forward
    # (the MoE gathers and splits the ranks' tokens by them).
    rank_token_counts: list[int] | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def attention_metadata(self, block_size: int) -> AttentionMetadata:
        """The per-step attention metadata every layer shares (built once per forward)."""
        return AttentionMetadata.build(self.positions, self.query_start_loc, self.seq_lens, self.block_tables,
                                       self.slot_mapping, block_size)

    def last_token_indices(self) -> torch.Tensor:
        """Index of each sequence's last token in the flat batch (where its next-token logits come from)."""
        return torch.tensor(self.query_start_loc[1:], dtype=torch.long) - 1

    def rank_rows(self, world_size: int) -> list[list[int]]:
        """Data-parallel attention: the token rows of each rank's sequences, in batch order."""
        assert self.dp_ranks is not None
        rows: list[list[int]] = [[] for _ in range(world_size)]
        for b, rank in enumerate(self.dp_ranks):
            rows[rank].extend(range(self.query_start_loc[b], self.query_start_loc[b + 1]))
        return rows

    def for_rank(self, rank: int, rows: list[list[int]]) -> ForwardBatch:
        """The sub-batch of the sequences ``rank`` holds (possibly empty); ``rows``: every rank's token rows
        (``rank_rows``)."""
        assert self.dp_ranks is not None
        seqs = [b for b, r in enumerate(self.dp_ranks) if r == rank]
        index = torch.tensor(rows[rank], dtype=torch.long, device=self.input_ids.device)
        starts = [0]
        for b in seqs:
            starts.append(starts[-1] + self.query_start_loc[b + 1] - self.query_start_loc[b])
        return ForwardBatch(self.input_ids[index], self.positions[index], starts, [self.seq_lens[b] for b in seqs],
                            self.block_tables[torch.tensor(seqs, dtype=torch.long, device=index.device)],
                            self.slot_mapping[index], [rank] * len(seqs), [len(r) for r in rows])
