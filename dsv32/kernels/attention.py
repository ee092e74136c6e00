"""Attention over the paged cache for a whole varlen batch: the metadata, built once per step, and the dispatch of
MLA and the lightning indexer to the backend's ops.

A step mixes decodes (one query token per sequence) and prefill chunks. ``AttentionMetadata.build`` lays the
decodes out once per step as one padded batch ``[B_d, L_max]`` of cache slots (vectorised, no per-sequence tensor
work), so every layer's decode attention and indexer run as a few batched ops; each prefill chunk keeps its own
context slots and is processed on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dsv32.kernels import get_backend
from dsv32.kernels.cache_format import CacheLayout


@dataclass
class PrefillSpan:
    """One prefill chunk's token rows ``[start, end)`` and its whole context's cache slots."""

    start: int
    end: int
    context_len: int
    slots: torch.Tensor  # [context_len] int64: cache slot of every context position 0..context_len-1
    positions: torch.Tensor  # [end - start] int64: absolute positions of its query tokens


@dataclass
class AttentionMetadata:
    """Per-step attention bookkeeping shared by all layers."""

    slot_mapping: torch.Tensor  # [T]: where each new token's KV is written
    prefills: list[PrefillSpan]
    num_decodes: int
    decode_rows: slice | torch.Tensor  # token rows of the decode queries (a slice when they lead the batch)
    decode_slots: torch.Tensor  # [B_d, L_max] context slots (padding points at valid slots and is masked)
    decode_lens: torch.Tensor  # [B_d] context lengths
    max_decode_len: int

    @classmethod
    def build(cls, positions: torch.Tensor, query_start_loc: list[int], seq_lens: list[int],
              block_tables: torch.Tensor, slot_mapping: torch.Tensor, block_size: int) -> AttentionMetadata:
        """Sequence ``b`` owns token rows ``query_start_loc[b]:query_start_loc[b+1]`` and has ``seq_lens[b]``
        context tokens (these included) in the blocks ``block_tables[b]``."""
        device = block_tables.device
        starts, ends = query_start_loc[:-1], query_start_loc[1:]
        decodes = [b for b, (s, e) in enumerate(zip(starts, ends, strict=True)) if e - s == 1]
        prefills = []
        for b, (start, end) in enumerate(zip(starts, ends, strict=True)):
            if end - start > 1:
                context = torch.arange(seq_lens[b], device=device)
                slots = block_tables[b, context // block_size] * block_size + context % block_size
                prefills.append(PrefillSpan(start, end, seq_lens[b], slots, positions[start:end]))
        lens = [seq_lens[b] for b in decodes]
        max_len = max(lens, default=0)
        if decodes == list(range(len(decodes))):
            rows: slice | torch.Tensor = slice(0, len(decodes))
            tables = block_tables[:len(decodes)]
        else:
            index = torch.tensor(decodes, dtype=torch.long, device=device)
            rows = torch.tensor([starts[b] for b in decodes], dtype=torch.long, device=device)
            tables = block_tables[index]
        context = torch.arange(max_len, device=device)
        decode_slots = tables[:, context // block_size] * block_size + context % block_size
        decode_lens = torch.tensor(lens, dtype=torch.long, device=device)
        return cls(slot_mapping, prefills, len(decodes), rows, decode_slots, decode_lens, max_len)


    @classmethod
    def for_decodes(cls, slot_mapping: torch.Tensor, decode_slots: torch.Tensor,
                    decode_lens: torch.Tensor) -> AttentionMetadata:
        """A step of decodes only, from tensors alone (what a captured decode graph is given): query ``b`` is token
        row ``b``, its context the first ``decode_lens[b]`` of ``decode_slots[b]``."""
        num_decodes, max_len = decode_slots.shape
        return cls(slot_mapping, [], num_decodes, slice(0, num_decodes), decode_slots, decode_lens, max_len)


# Last-level cache size assumed where the OS does not report one.
DEFAULT_LLC_BYTES = 32 << 20
LLC_SIZE_FILE = "/sys/devices/system/cpu/cpu0/cache/index3/size"


def last_level_cache_bytes(path: str = LLC_SIZE_FILE) -> int:
    """This CPU's last-level cache in bytes (Linux sysfs, e.g. ``32768K``: per core complex), or
    ``DEFAULT_LLC_BYTES`` where it is not reported."""
    try:
        with open(path, encoding="ascii") as fh:
            text = fh.read().strip().upper()
    except OSError:
        return DEFAULT_LLC_BYTES
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    try:
        return int(text[:-1]) * units[text[-1]] if text[-1:] in units else int(text)
    except ValueError:
        return DEFAULT_LLC_BYTES


def absorbed_dtype(device: torch.device, dtype: torch.dtype, absorbed_elements: int) -> torch.dtype:
    """The dtype of the absorbed MLA weights (``MLAWeights``) of a model whose layers hold ``absorbed_elements`` of
    them in all. On a CPU, fp32 while their fp32 copies fit in half the last-level cache (the other weights stream
    through the rest every step): the per-head products are tiny, and MKL's sgemm runs them faster than oneDNN's
    bf16 path on cache-resident weights (the tiny model's compiled batch-1 decode: 166 against 135-142 tok/s).
    Past the cache they stream from memory every step, where bf16 reads half the bytes (16 heads, both products of
    a layer, cold: 324 against 518 us; 128 heads: 2.2 against 4.1 ms) and holds half the memory. Elsewhere, the
    compute dtype."""
    if device.type == "cpu" and absorbed_elements * 4 <= last_level_cache_bytes() // 2:
        return torch.float32
    return dtype


@dataclass(frozen=True)
class MLAWeights:
    """``W_kvb`` in the compute dtype, prepared once at load, and its absorbed parts laid out for batched GEMMs:
    ``w_kvb`` [H * (d_n + d_v), r] (expands the latent, non-absorbed form), ``w_uk`` [H, d_n, r] (folded into the
    query) and ``w_uv`` [H, r, d_v] (``W_UV^T``, applied after the attention). The absorbed parts are contiguous
    copies (a ``bmm`` would otherwise copy a strided view of ``w_kvb`` on every call), in ``absorbed_dtype``'s
    choice (default: ``w_kvb``'s dtype); ``absorb`` / ``unabsorb`` round the products back to the compute dtype."""

    w_kvb: torch.Tensor
    w_uk: torch.Tensor
    w_uv: torch.Tensor

    @classmethod
    def from_kv_b(cls, w_kvb: torch.Tensor, n_heads: int, nope_dim: int,
                  dtype: torch.dtype | None = None) -> MLAWeights:
        w = w_kvb.view(n_heads, -1, w_kvb.shape[-1])
        dtype = dtype or w_kvb.dtype
        w_uk, w_uv = w[:, :nope_dim], w[:, nope_dim:].transpose(1, 2)
        return cls(w_kvb, w_uk.to(dtype).contiguous(), w_uv.to(dtype).contiguous())

    def absorb(self, q_nope: torch.Tensor) -> torch.Tensor:
        """``W_UK^T q_nope`` per head: ``[n, H, d_n]`` -> ``[n, H, r]`` in ``q_nope``'s dtype."""
        return torch.bmm(q_nope.to(self.w_uk.dtype).transpose(0, 1), self.w_uk).transpose(0, 1).to(q_nope.dtype)

    def unabsorb(self, o_latent: torch.Tensor) -> torch.Tensor:
        """``W_UV`` applied to attended latents: ``[n, H, r]`` -> ``[n, H, d_v]`` in ``o_latent``'s dtype."""
        return torch.bmm(o_latent.to(self.w_uv.dtype).transpose(0, 1), self.w_uv).transpose(0, 1).to(o_latent.dtype)


@dataclass
class IndexSelection:
    """The context positions each query may attend (``-1`` padded); ``None`` means every causal key (context <=
    index_topk)."""

    prefill: list[torch.Tensor | None] = field(default_factory=list)  # per prefill span: [n, k]
    decode: torch.Tensor | None = None  # [B_d, k]


def indexer_select(q: torch.Tensor, weights: torch.Tensor, index_cache: torch.Tensor, layout: CacheLayout,
                   meta: AttentionMetadata, topk: int) -> IndexSelection:
    """Top-k context positions of every query (``q`` [T, H, D] post-RoPE, head ``weights`` [T, H]); contexts no
    longer than ``topk`` select everything and are not scored."""
    backend = get_backend(q.device)
    selection = IndexSelection()
    for span in meta.prefills:
        rows = slice(span.start, span.end)
        selection.prefill.append(None if span.context_len <= topk else backend.indexer_topk(
            q[rows][None], weights[rows][None], index_cache, layout, span.slots[None], (span.positions + 1)[None],
            topk)[0])
    if meta.num_decodes and meta.max_decode_len > topk:
        rows = meta.decode_rows
        selection.decode = backend.indexer_topk(q[rows][:, None], weights[rows][:, None], index_cache, layout,
                                                meta.decode_slots, meta.decode_lens[:, None], topk)[:, 0]
    return selection


def mla_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, weights: MLAWeights, latent_cache: torch.Tensor,
                  layout: CacheLayout, meta: AttentionMetadata, selection: IndexSelection | None,
                  softmax_scale: float) -> torch.Tensor:
    """MLA of every query of the step ``[T, H, d_v]``: each prefill chunk on its own, all decodes at once (no query:
    an empty result, for a data-parallel rank with nothing of its own this step)."""
    backend = get_backend(q_nope.device)
    if not meta.prefills and meta.num_decodes:  # decode-only step: no scatter into an output buffer
        return backend.mla_decode(q_nope, q_pe, weights, latent_cache, layout, meta.decode_slots, meta.decode_lens,
                                  selection.decode if selection else None, softmax_scale)
    out = q_nope.new_empty(q_nope.shape[0], q_nope.shape[1], weights.w_uv.shape[2])
    for i, span in enumerate(meta.prefills):
        rows = slice(span.start, span.end)
        out[rows] = backend.mla_prefill(q_nope[rows], q_pe[rows], weights, latent_cache, layout, span.slots,
                                        span.positions, selection.prefill[i] if selection else None, softmax_scale)
    if meta.num_decodes:
        rows = meta.decode_rows
        out[rows] = backend.mla_decode(q_nope[rows], q_pe[rows], weights, latent_cache, layout, meta.decode_slots,
                                       meta.decode_lens, selection.decode if selection else None, softmax_scale)
    return out
