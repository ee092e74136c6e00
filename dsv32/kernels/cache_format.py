"""The paged KV-cache row formats: how one token of one layer is stored, encoded and decoded.

Two storage formats:

``auto`` (compute dtype)
    latent row = ``[c (kv_lora_rank) ; k_pe (rope dim)]`` (576 values for the real model); indexer row = ``k``.
``fp8``
    latent row = FlashMLA's "FP8 with scale" layout, as bytes: ``kv_lora_rank`` e4m3 values (one tile per 128),
    one fp32 scale per tile, then ``k_pe`` in bf16 -> 512 + 16 + 128 = **656 bytes** for the real model.
    indexer row = Hadamard-rotated ``k`` in e4m3 plus one fp32 scale -> 128 + 4 = **132 bytes**, as DeepSeek's
    indexer caches it (the query is rotated and quantised the same way when scoring).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv32.kernels.fp8 import FP8_DTYPE, act_dequant, act_quant, hadamard


def normalize_kv_cache_dtype(kv_cache_dtype: str) -> str:
    fmt = {"auto": "auto", "fp8": "fp8", "fp8_e4m3": "fp8"}.get(kv_cache_dtype)
    if fmt is None:
        raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r}: expected auto, fp8 or fp8_e4m3")
    return fmt


@dataclass(frozen=True)
class CacheLayout:
    """Widths of one cached token in one layer, for a given format."""

    kv_lora_rank: int
    rope_dim: int
    index_head_dim: int  # 0 = no indexer
    fmt: str
    dtype: torch.dtype

    @property
    def tile(self) -> int:
        return 128 if self.kv_lora_rank % 128 == 0 else self.kv_lora_rank

    @property
    def latent_width(self) -> int:
        if self.fmt == "auto":
            return self.kv_lora_rank + self.rope_dim
        return self.kv_lora_rank + 4 * (self.kv_lora_rank // self.tile) + 2 * self.rope_dim

    @property
    def index_width(self) -> int:
        if not self.index_head_dim:
            return 0
        return self.index_head_dim if self.fmt == "auto" else self.index_head_dim + 4

    @property
    def storage_dtype(self) -> torch.dtype:
        return self.dtype if self.fmt == "auto" else torch.uint8

    def bytes_per_token(self) -> int:
        size = torch.empty((), dtype=self.storage_dtype).element_size()
        return (self.latent_width + self.index_width) * size


def encode_latent_rows(c: torch.Tensor, k_pe: torch.Tensor, layout: CacheLayout) -> torch.Tensor:
    """Latent cache rows ``[L, latent_width]`` (storage dtype) of ``c [L, kv_lora_rank]`` and ``k_pe [L, rope_dim]``."""
    if layout.fmt == "auto":
        return torch.cat((c, k_pe), dim=-1).to(layout.dtype)
    q, s = act_quant(c, layout.tile)
    return torch.cat((q.view(torch.uint8), s.float().contiguous().view(torch.uint8),
                      k_pe.to(torch.bfloat16).contiguous().view(torch.uint8)), dim=-1)


def encode_index_rows(k: torch.Tensor, layout: CacheLayout) -> torch.Tensor:
    """Indexer-key cache rows ``[L, index_width]`` (storage dtype) of keys ``k [L, index_head_dim]``."""
    if layout.fmt == "auto":
        return k.to(layout.dtype)
    q, s = act_quant(hadamard(k), layout.index_head_dim)
    return torch.cat((q.view(torch.uint8), s.float().contiguous().view(torch.uint8)), -1)


def read_latent_rows(rows: torch.Tensor, layout: CacheLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode latent cache rows ``[L, width]`` into ``(c [L, kv_lora_rank], k_pe [L, rope_dim])`` (compute dtype)."""
    r = layout.kv_lora_rank
    if layout.fmt == "auto":
        return rows[:, :r], rows[:, r:]
    n_tiles = r // layout.tile
    q = rows[:, :r].contiguous().view(FP8_DTYPE)
    s = rows[:, r:r + 4 * n_tiles].contiguous().view(torch.float32)
    k_pe = rows[:, r + 4 * n_tiles:].contiguous().view(torch.bfloat16)
    return act_dequant(q, s, layout.dtype), k_pe.to(layout.dtype)


def read_index_rows(rows: torch.Tensor, layout: CacheLayout) -> torch.Tensor:
    """Decode indexer-key cache rows into fp32 keys ``[L, index_head_dim]`` (fp8: rotated and FP8-rounded)."""
    if layout.fmt == "auto":
        return rows.float()
    d = layout.index_head_dim
    q = rows[:, :d].contiguous().view(FP8_DTYPE)
    s = rows[:, d:].contiguous().view(torch.float32)
    return act_dequant(q, s, torch.float32)


def prepare_index_q(q: torch.Tensor, layout: CacheLayout) -> torch.Tensor:
    """Indexer queries ``[..., index_head_dim]`` in the keys' numeric domain: fp32, and for ``fp8``
    Hadamard-rotated and FP8-rounded like the cached keys."""
    if layout.fmt == "auto":
        return q.float()
    qq, s = act_quant(hadamard(q), layout.index_head_dim)
    return act_dequant(qq, s, torch.float32)
