"""Paged KV-cache storage of one model: per layer, the MLA latent + rope key and the indexer key of every token.

All sequences share one pool of ``num_blocks * block_size`` slots per layer; the engine decides which slots a
sequence owns (its block table) and the model reads/writes them by slot index. One more block, ``scratch_block``,
belongs to no sequence: the padding rows of a captured decode step (``dsv32.model.graphs``) write and read there.
The row formats (``auto`` / ``fp8``) are ``dsv32.kernels.cache_format``'s.
"""

from __future__ import annotations

import torch

from dsv32.kernels.cache_format import (
    CacheLayout,
    encode_index_rows,
    encode_latent_rows,
    read_index_rows,
    read_latent_rows,
)


class KVCache:
    """The slot pool of every layer (``num_layers`` x ``num_slots`` rows), in its layout's row format."""

    def __init__(self, layout: CacheLayout, num_layers: int, num_blocks: int, block_size: int,
                 device: torch.device) -> None:
        self.layout = layout
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.scratch_block = num_blocks
        slots = (num_blocks + 1) * block_size
        self.latent = [torch.zeros(slots, layout.latent_width, dtype=layout.storage_dtype, device=device)
                       for _ in range(num_layers)]
        self.index_k = [torch.zeros(slots, layout.index_width, dtype=layout.storage_dtype, device=device)
                        for _ in range(num_layers)] if layout.index_width else []

    # ---- MLA latent ---------------------------------------------------------------------------------------
    def write_latent(self, layer: int, slots: torch.Tensor, c: torch.Tensor, k_pe: torch.Tensor) -> None:
        self.latent[layer][slots] = encode_latent_rows(c, k_pe, self.layout)

    def read_latent(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(c [L, kv_lora_rank], k_pe [L, rope_dim])`` in the compute dtype."""
        return read_latent_rows(self.latent[layer][slots], self.layout)

    # ---- indexer keys -------------------------------------------------------------------------------------
    def write_index_k(self, layer: int, slots: torch.Tensor, k: torch.Tensor) -> None:
        self.index_k[layer][slots] = encode_index_rows(k, self.layout)

    def read_index_k(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """Indexer keys ``[L, index_head_dim]`` (fp32; in fp8 format: rotated and FP8-rounded)."""
        return read_index_rows(self.index_k[layer][slots], self.layout)
