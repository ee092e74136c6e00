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
