"""Shared builders for the kernel tests: paged caches filled at scattered slots, in either storage format."""

from __future__ import annotations

import torch

from dsv32.kernels.cache_format import CacheLayout
from dsv32.model.cache import KVCache


def make_cache(fmt: str, dtype: torch.dtype, num_slots: int, kv_lora_rank: int = 512, rope_dim: int = 64,
               index_head_dim: int = 128, device: torch.device | str = "cpu") -> KVCache:
    """A one-layer cache of ``num_slots`` slots (blocks of 16) in format ``fmt``."""
    layout = CacheLayout(kv_lora_rank, rope_dim, index_head_dim, fmt, dtype)
    return KVCache(layout, 1, -(-num_slots // 16), 16, torch.device(device))


def scattered_slots(num: int, num_slots: int, gen: torch.Generator) -> torch.Tensor:
    """``num`` distinct slots in random order (contexts are paged, not contiguous)."""
    return torch.randperm(num_slots, generator=gen)[:num]


def fill_cache(cache: KVCache, slots: torch.Tensor, gen: torch.Generator) -> None:
    """Random latents, rope keys and indexer keys at ``slots`` (written through the cache's own encoders)."""
    lay = cache.layout
    n = slots.numel()
    c = (torch.randn(n, lay.kv_lora_rank, generator=gen)).to(lay.dtype)
    k_pe = torch.randn(n, lay.rope_dim, generator=gen).to(lay.dtype)
    cache.write_latent(0, slots, c, k_pe)
    if lay.index_head_dim:
        cache.write_index_k(0, slots, torch.randn(n, lay.index_head_dim, generator=gen).to(lay.dtype))
