"""Triton lightning-indexer scores over the paged key cache, then top-k: which context positions each query attends.

``scores[i, t] = k_scale[t] * sum_h w'[i, h] * ReLU(q[i, h] . k[t])`` for ``t < kv_len[i]`` (``-inf`` beyond), where
``k`` is read straight from the cache rows at ``slot_table[b, t]`` (``auto``: compute dtype, ``k_scale = 1``;
``fp8``: 128 e4m3 values + one fp32 scale per 132-byte row). For ``fp8`` the queries are Hadamard-rotated and
quantised to e4m3 like the keys, and their positive per-(token, head) scales are folded into ``w'`` together with
``D^-0.5`` (ReLU commutes with a positive factor), so the dot runs on e4m3 tensor cores with fp32 accumulation.

One program scores ``BLOCK_L`` keys for all heads of one query (``[H, D] x [D, BLOCK_L]``); the selection is a
``torch.topk`` per key tile, merged across tiles, so the scores held at once stay bounded at any context length.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv32.kernels.cache_format import CacheLayout
from dsv32.kernels.fp8 import act_quant, hadamard
from dsv32.kernels.tiled import merge_topk
from dsv32.kernels.triton_common import check_device, dot_precision, dot_type, next_power_of_2


@triton.jit
def _indexer_scores_kernel(q_ptr, w_ptr, k_ptr, k_scale_ptr, slot_ptr, kv_len_ptr, out_ptr,
                           queries_per_seq, context_len,
                           stride_q_tok, stride_q_head, stride_w_tok, stride_k_row, stride_k_scale_row,
                           stride_slot_seq, stride_out_tok,
                           N_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
                           BLOCK_L: tl.constexpr, FP8: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):
    query = tl.program_id(0)
    seq = query // queries_per_seq
    t = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    kv_len = tl.load(kv_len_ptr + query)
    visible = t < kv_len
    slots = tl.load(slot_ptr + seq * stride_slot_seq + t, mask=visible, other=0)
    d = tl.arange(0, HEAD_DIM)
    keys = tl.load(k_ptr + slots[:, None] * stride_k_row + d[None, :], mask=visible[:, None], other=0.0)
    heads = tl.arange(0, BLOCK_H)
    q = tl.load(q_ptr + query * stride_q_tok + heads[:, None] * stride_q_head + d[None, :],
                mask=heads[:, None] < N_HEADS, other=0.0)
    dots = tl.dot(q.to(DOT), tl.trans(keys.to(DOT)), input_precision=PRECISION)  # [BLOCK_H, BLOCK_L] fp32
    w = tl.load(w_ptr + query * stride_w_tok + heads, mask=heads < N_HEADS, other=0.0)
    scores = tl.sum(tl.maximum(dots, 0.0) * w[:, None], axis=0)
    if FP8:
        scores *= tl.load(k_scale_ptr + slots * stride_k_scale_row, mask=visible, other=0.0)
    scores = tl.where(visible, scores, float("-inf"))
    tl.store(out_ptr + query * stride_out_tok + t, scores, mask=t < context_len)


def indexer_scores(q: torch.Tensor, weights: torch.Tensor, index_cache: torch.Tensor, layout: CacheLayout,
                   slot_table: torch.Tensor, kv_lens: torch.Tensor, block_l: int = 64) -> torch.Tensor:
    """Scores ``[B, n, L]`` fp32 (``-inf`` at invisible positions) of queries ``q`` [B, n, H, D] (post-RoPE,
    unrotated) with head weights ``weights`` [B, n, H] against the keys at ``slot_table`` [B, L]; query ``(b, i)``
    sees positions ``< kv_lens[b, i]``."""
    check_device(q, index_cache)
    batch, n, n_heads, head_dim = q.shape
    length = slot_table.shape[1]
    weights = weights.float() * head_dim**-0.5
    if layout.fmt == "fp8":
        q, q_scale = act_quant(hadamard(q), head_dim)
        weights = weights * q_scale[..., 0]
        keys = index_cache.view(torch.float8_e4m3fn)
        key_scales = index_cache.view(torch.float32)[:, head_dim // 4]
    else:
        keys = index_cache
        key_scales = index_cache  # unused
    q = q.reshape(batch * n, n_heads, head_dim)
    weights = weights.reshape(batch * n, n_heads).contiguous()
    slot_table = slot_table.contiguous()
    kv_lens = kv_lens.reshape(batch * n).to(torch.int64).contiguous()
    out = torch.empty(batch * n, length, dtype=torch.float32, device=q.device)
    if length == 0 or batch * n == 0:
        return out.view(batch, n, length)
    grid = (batch * n, triton.cdiv(length, block_l))
    _indexer_scores_kernel[grid](
        q, weights, keys, key_scales, slot_table, kv_lens, out, n, length,
        q.stride(0), q.stride(1), weights.stride(0), keys.stride(0), key_scales.stride(0),
        slot_table.stride(0), out.stride(0),
        N_HEADS=n_heads, HEAD_DIM=head_dim, BLOCK_H=max(16, next_power_of_2(n_heads)), BLOCK_L=block_l,
        FP8=layout.fmt == "fp8", DOT=dot_type(q.dtype), PRECISION=dot_precision(q.dtype))
    return out.view(batch, n, length)


# fp32 scores one tile of ``indexer_topk`` holds ([queries, key tile]): 128M, 512 MiB, whatever the context (a
# [chunk, context] score matrix is what runs SGLang's indexer out of memory at long context: 8K x 128K is 4 GiB).
LOGITS_ELEMENTS = 1 << 27


def indexer_topk(q: torch.Tensor, weights: torch.Tensor, index_cache: torch.Tensor, layout: CacheLayout,
                 slot_table: torch.Tensor, kv_lens: torch.Tensor, topk: int, block_l: int = 64) -> torch.Tensor:
    """Same contract as ``dsv32.kernels.reference.indexer_topk``: top-k context positions ``[B, n, min(topk, L)]``,
    ``-1`` where a query sees fewer keys. The context is scored in key tiles of at most ``LOGITS_ELEMENTS`` scores,
    each merged into a running top-k (``dsv32.kernels.tiled.merge_topk``)."""
    batch, n = q.shape[:2]
    length = slot_table.shape[1]
    k_out = min(topk, length)
    key_tile = max(k_out, LOGITS_ELEMENTS // max(1, batch * n), block_l)
    best_scores = torch.empty(batch, n, 0, dtype=torch.float32, device=q.device)
    best_positions = torch.empty(batch, n, 0, dtype=torch.long, device=q.device)
    for t0 in range(0, length, key_tile):
        t1 = min(length, t0 + key_tile)
        scores = indexer_scores(q, weights, index_cache, layout, slot_table[:, t0:t1], kv_lens - t0, block_l)
        positions = torch.arange(t0, t1, device=q.device)
        best_positions, best_scores = merge_topk(best_positions, best_scores, positions, scores, k_out)
    return torch.where(torch.isneginf(best_scores), -1, best_positions)
