"""Triton sparse MLA attention in the weight-absorbed (MQA) form, for decode and prefill, straight off the paged cache.

Every head of a query attends the same cache entries: 576-wide keys ``[c ; k_pe]`` and 512-wide values ``c`` (the real
model's widths; any power-of-two ``kv_lora_rank`` / rope dim works). Query ``i`` attends the slots
``kv_slots[i, :kv_lens[i]]``, ``-1`` entries skipped, which covers all three uses with one kernel:

* sparse (DSA): ``kv_slots[i]`` = the slots of the indexer's top-k positions (``-1`` padded);
* dense decode: ``kv_slots[b]`` = the sequence's slot table, ``kv_lens[b]`` = its context length;
* dense prefill: the sequence's slot table broadcast over its queries (stride 0), ``kv_lens[i]`` = position + 1.

One program owns ``BLOCK_H`` heads of one query (the heads are the M dimension of both GEMMs, as in FlashMLA: 128
heads x 1 query is compute-dense without grouping queries) and streams ``BLOCK_N`` keys at a time with an online
softmax. Decode of few sequences splits the key range over ``num_splits`` programs and merges their partial
``(o, lse)`` afterwards (flash-decoding), so batch 1 still fills the GPU. FP8 cache rows (656 bytes: 512 e4m3, four
fp32 tile scales, 64 bf16) are dequantised in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv32.kernels.attention import MLAWeights
from dsv32.kernels.cache_format import CacheLayout
from dsv32.kernels.reference import positions_to_slots
from dsv32.kernels.triton_common import check_device, dot_precision, dot_type, next_power_of_2


@triton.jit
def _sparse_mla_kernel(q_ptr, c_ptr, pe_ptr, scale_ptr, slot_ptr, kv_len_ptr, o_ptr, lse_ptr,
                       n_heads, softmax_scale, keys_per_split,
                       stride_q_tok, stride_q_head, stride_c_row, stride_pe_row, stride_scale_row,
                       stride_slot_tok, stride_slot_key, stride_o_tok, stride_o_head, stride_o_split,
                       stride_lse_tok, stride_lse_head, stride_lse_split,
                       RANK: tl.constexpr, ROPE: tl.constexpr, TILE: tl.constexpr, BLOCK_H: tl.constexpr,
                       BLOCK_N: tl.constexpr, FP8: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):
    query = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(2)
    head_ok = heads < n_heads
    kv_len = tl.load(kv_len_ptr + query)
    start = split * keys_per_split
    end = tl.minimum(kv_len, start + keys_per_split)

    r = tl.arange(0, RANK)
    p = tl.arange(0, ROPE)
    q_row = q_ptr + query * stride_q_tok + heads[:, None] * stride_q_head
    q_lat = tl.load(q_row + r[None, :], mask=head_ok[:, None], other=0.0).to(DOT)
    q_pe = tl.load(q_row + RANK + p[None, :], mask=head_ok[:, None], other=0.0).to(DOT)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, RANK], dtype=tl.float32)
    for key0 in range(start, end, BLOCK_N):
        t = key0 + tl.arange(0, BLOCK_N)
        slots = tl.load(slot_ptr + query * stride_slot_tok + t * stride_slot_key, mask=t < end, other=-1)
        valid = slots >= 0
        rows = tl.where(valid, slots, 0).to(tl.int64)
        c = tl.load(c_ptr + rows[:, None] * stride_c_row + r[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        if FP8:
            c *= tl.load(scale_ptr + rows[:, None] * stride_scale_row + (r // TILE)[None, :], mask=valid[:, None],
                         other=0.0)
        k_pe = tl.load(pe_ptr + rows[:, None] * stride_pe_row + p[None, :], mask=valid[:, None], other=0.0)
        c_dot = c.to(DOT)
        scores = tl.dot(q_lat, tl.trans(c_dot), input_precision=PRECISION)
        scores += tl.dot(q_pe, tl.trans(k_pe.to(DOT)), input_precision=PRECISION)
        scores = tl.where(valid[None, :], scores * softmax_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: keep everything at 0
        alpha = tl.exp(m_i - m_safe)
        probs = tl.exp(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(probs, axis=1)
        acc = acc * alpha[:, None] + tl.dot(probs.to(DOT), c_dot, input_precision=PRECISION)
        m_i = m_new

    has_keys = l_i > 0.0
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    o_ptrs = o_ptr + query * stride_o_tok + heads[:, None] * stride_o_head + split * stride_o_split + r[None, :]
    tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=head_ok[:, None])
    tl.store(lse_ptr + query * stride_lse_tok + heads * stride_lse_head + split * stride_lse_split, lse, mask=head_ok)


def _cache_views(latent_cache: torch.Tensor, layout: CacheLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(c values, k_pe, tile scales)`` as strided views of the same cache rows (scales unused for ``auto``)."""
    r = layout.kv_lora_rank
    if layout.fmt == "auto":
        return latent_cache, latent_cache[:, r:], latent_cache
    n_tiles = r // layout.tile
    return (latent_cache.view(torch.float8_e4m3fn), latent_cache.view(torch.bfloat16)[:, (r + 4 * n_tiles) // 2:],
            latent_cache.view(torch.float32)[:, r // 4:])


def default_num_splits(num_queries: int, head_blocks: int, max_keys: int, block_n: int) -> int:
    """Enough key splits to give a GPU (~132 SMs) about two programs per SM, each keeping >= 4 key blocks."""
    if not torch.cuda.is_available():
        return 1
    programs = num_queries * head_blocks
    wanted = triton.cdiv(2 * torch.cuda.get_device_properties(0).multi_processor_count, programs)
    return max(1, min(wanted, triton.cdiv(max_keys, 4 * block_n)))


def sparse_mla_attention(q: torch.Tensor, latent_cache: torch.Tensor, layout: CacheLayout, kv_slots: torch.Tensor,
                         kv_lens: torch.Tensor, softmax_scale: float, num_splits: int | None = None,
                         block_h: int = 64, block_n: int = 32, num_warps: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``dsv32.kernels.reference.sparse_mla_attention``: ``(o [N, H, r], lse [N, H])``. The tile
    defaults (64 heads x 32 keys, 8 warps: a [64, 512] fp32 accumulator in registers) are untuned starting points."""
    check_device(q, latent_cache)
    n, n_heads, width = q.shape
    rank, rope = layout.kv_lora_rank, layout.rope_dim
    if width != rank + rope:
        raise ValueError(f"q is {width} wide, expected kv_lora_rank + rope_dim = {rank + rope}")
    block_h = max(16, min(block_h, next_power_of_2(n_heads)))
    head_blocks = triton.cdiv(n_heads, block_h)
    max_keys = kv_slots.shape[1]
    if num_splits is None:
        num_splits = default_num_splits(n, head_blocks, max_keys, block_n)
    keys_per_split = triton.cdiv(max(max_keys, 1), num_splits * block_n) * block_n
    kv_lens = kv_lens.to(torch.int64).contiguous()
    c, k_pe, scales = _cache_views(latent_cache, layout)
    if num_splits == 1:
        o = torch.empty(n, n_heads, 1, rank, dtype=q.dtype, device=q.device)
    else:
        o = torch.empty(n, n_heads, num_splits, rank, dtype=torch.float32, device=q.device)
    lse = torch.empty(n, n_heads, num_splits, dtype=torch.float32, device=q.device)
    if n:
        _sparse_mla_kernel[(n, head_blocks, num_splits)](
            q, c, k_pe, scales, kv_slots, kv_lens, o, lse, n_heads, softmax_scale, keys_per_split,
            q.stride(0), q.stride(1), c.stride(0), k_pe.stride(0), scales.stride(0),
            kv_slots.stride(0), kv_slots.stride(1), o.stride(0), o.stride(1), o.stride(2),
            lse.stride(0), lse.stride(1), lse.stride(2),
            RANK=rank, ROPE=rope, TILE=layout.tile, BLOCK_H=block_h, BLOCK_N=block_n, FP8=layout.fmt == "fp8",
            DOT=dot_type(q.dtype), PRECISION=dot_precision(q.dtype), num_warps=num_warps)
    if num_splits == 1:
        return o[:, :, 0], lse[:, :, 0]
    return _merge_splits(o, lse, q.dtype)


def _merge_splits(o: torch.Tensor, lse: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine per-split softmax results: weights ``exp(lse_s - lse)`` (splits without keys weigh 0)."""
    total = lse.logsumexp(-1)
    weights = torch.exp(lse - total[..., None].clamp(min=torch.finfo(torch.float32).min)).nan_to_num(0.0)
    return (o * weights[..., None]).sum(2).to(dtype), total


def _absorb(q_nope: torch.Tensor, q_pe: torch.Tensor, weights: MLAWeights) -> torch.Tensor:
    """``[W_UK^T q_nope ; q_pe]`` per head ``[n, H, r + d_r]``."""
    q_abs = weights.absorb(q_nope)
    return torch.cat((q_abs, q_pe.to(q_abs.dtype)), dim=-1)


def mla_decode(q_nope: torch.Tensor, q_pe: torch.Tensor, weights: MLAWeights, latent_cache: torch.Tensor,
               layout: CacheLayout, slot_table: torch.Tensor, kv_lens: torch.Tensor,
               topk_positions: torch.Tensor | None, softmax_scale: float) -> torch.Tensor:
    """Same contract as ``dsv32.kernels.reference.mla_decode`` (``[B, H, d_v]``)."""
    q = _absorb(q_nope, q_pe, weights)
    if topk_positions is None:
        kv_slots = slot_table
    else:
        kv_slots = positions_to_slots(topk_positions[:, None], slot_table)[:, 0]
        kv_lens = torch.full_like(kv_lens, kv_slots.shape[1])
    o_latent, _ = sparse_mla_attention(q, latent_cache, layout, kv_slots, kv_lens, softmax_scale)
    return weights.unabsorb(o_latent)


def mla_prefill(q_nope: torch.Tensor, q_pe: torch.Tensor, weights: MLAWeights, latent_cache: torch.Tensor,
                layout: CacheLayout, slots: torch.Tensor, positions: torch.Tensor,
                topk_positions: torch.Tensor | None, softmax_scale: float) -> torch.Tensor:
    """Same contract as ``dsv32.kernels.reference.mla_prefill`` (``[n, H, d_v]``), computed in the absorbed form."""
    q = _absorb(q_nope, q_pe, weights)
    n = q.shape[0]
    if topk_positions is None:
        kv_slots = slots[None].expand(n, -1)  # one slot table shared by all queries (stride 0)
        kv_lens = positions + 1
    else:
        kv_slots = positions_to_slots(topk_positions[None], slots[None])[0]
        kv_lens = torch.full((n,), kv_slots.shape[1], dtype=torch.int64, device=q.device)
    o_latent, _ = sparse_mla_attention(q, latent_cache, layout, kv_slots, kv_lens, softmax_scale, num_splits=1)
    return weights.unabsorb(o_latent)
