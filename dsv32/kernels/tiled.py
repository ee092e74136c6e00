"""The CPU backend's long-context ops: the lightning indexer and sparse prefill attention with memory bounded by a tile,
whatever the context length.

``dsv32.kernels.reference`` holds the plain forms of these ops (the test oracle): they score every query against the
whole context at once (``[n, H, L]`` fp32 index scores, ``[H, n, L]`` attention scores), which at long context costs
gigabytes per step. Here the same contracts are met tile by tile:

* ``indexer_topk``: key tiles are read straight from the paged index cache; per tile the per-head dots are formed,
  ReLU'd, weighted and summed over heads, leaving ``[queries, tile]`` scores that are merged into a running top-k
  (``[queries, k]``). Transient memory is ``O(queries x (tile + k))``; keys past every query's causal horizon are
  never read. A decode (one query per sequence) scores all its keys in one pass instead. The GEMMs run in the
  cache's dtype (``index_scores``): fp32 caches as the reference; a bf16 cache's keys are multiplied as stored,
  with fp32 accumulation, at ~2.5x the speed of fp32 here, though this CPU's bf16 GEMMs (torch 2.13, oneDNN) round
  each head's dot to bf16: the scores then move by up to ~2^-9 of their head sum.
* ``mla_prefill``: with a top-k selection, each query attends only its selected rows, in whichever form costs less
  for the chunk: the expanded (MHA) form over the rows some query of the chunk selected (read and up-projected once;
  a key no query selected is never touched), or the absorbed (MQA) form over each query's own gathered latent rows
  (no up-projection); both in query blocks whose transient tensors stay within a fixed budget. Without a selection
  (context <= ``index_topk``: the paper's dense "masked MHA mode" for short prefill) it is the reference.

Selections equal the reference's up to ties (the merge may keep a different one of equal scores) and, with a bf16
cache, up to keys whose scores lie within that rounding of the top-k boundary; attention outputs agree to rounding
(the softmax runs over the selected columns only, in another summation order).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from dsv32.kernels import reference
from dsv32.kernels.cache_format import CacheLayout, prepare_index_q, read_index_rows, read_latent_rows

if TYPE_CHECKING:
    from dsv32.kernels.attention import MLAWeights

# fp32 elements of one tile's transient products (indexer: per-head dots [B, keys, queries x H]; attention: scores
# [H, queries, keys]): 2M = 8 MiB whatever the context (32 MiB tiles measured no faster here, and a tile's
# transients are part of the step's peak memory).
TILE_ELEMENTS = 1 << 21
# Keys per indexer tile, at least: no fewer than top-k keeps the merges (a top-k over k + tile candidates) cheap
# against the scoring; the query block shrinks to keep the tile within TILE_ELEMENTS.
MIN_KEY_TILE = 256
# Cache-row elements the absorbed sparse prefill gathers at once ([queries, k, latent_width] in the storage dtype):
# 8M, 16 MiB in bf16 (7 queries of the real top-2048 a block).
GATHER_ELEMENTS = 1 << 23


def indexer_topk(q: torch.Tensor, weights: torch.Tensor, index_cache: torch.Tensor, layout: CacheLayout,
                 slot_table: torch.Tensor, kv_lens: torch.Tensor, topk: int) -> torch.Tensor:
    """``reference.indexer_topk``'s contract, tile by tile: top-k context positions ``[B, n, min(topk, L)]`` (``-1``
    padded) of queries ``q`` [B, n, H, D] with head weights [B, n, H] over the keys at ``slot_table`` [B, L], query
    ``(b, i)`` seeing positions ``< kv_lens[b, i]``."""
    batch, length = slot_table.shape
    _, n, n_heads, dim = q.shape
    if n == 1 or torch.compiler.is_compiling():
        # A decode step (one query per sequence; captured or not: in a graph ``L`` is a dynamic dimension the tile
        # loop cannot follow): its scores are [B, 1, L], one tile's worth at B * H queries, and a single top-k over
        # them costs less than a tile loop's merges.
        return _one_pass_topk(q, weights, index_cache, layout, slot_table, kv_lens, topk)
    k_out = min(topk, length)
    out = torch.full((batch, n, k_out), -1, dtype=torch.long, device=q.device)
    if k_out == 0 or n == 0:
        return out
    q_cols = index_queries(q, layout, index_cache.dtype)
    weights = weights.float()
    key_tile = max(MIN_KEY_TILE, topk, TILE_ELEMENTS // (batch * n * n_heads))
    query_block = max(1, TILE_ELEMENTS // (batch * n_heads * key_tile))
    for q0 in range(0, n, query_block):
        rows = slice(q0, min(n, q0 + query_block))
        columns = slice(q0 * n_heads, rows.stop * n_heads)
        positions, scores = _block_topk(q_cols[..., columns], weights[:, rows], index_cache, layout, slot_table,
                                        kv_lens[:, rows], k_out, key_tile)
        out[:, rows, :positions.shape[-1]] = torch.where(torch.isneginf(scores), -1, positions)
    return out


def _one_pass_topk(q: torch.Tensor, weights: torch.Tensor, index_cache: torch.Tensor, layout: CacheLayout,
                   slot_table: torch.Tensor, kv_lens: torch.Tensor, topk: int) -> torch.Tensor:
    """``indexer_topk`` for few queries per sequence: all keys scored at once, one top-k."""
    batch, length = slot_table.shape
    rows = index_cache.index_select(0, slot_table.flatten())
    scores = index_scores(index_queries(q, layout, index_cache.dtype), weights.float(), rows, layout)
    allowed = torch.arange(length, device=q.device) < kv_lens[..., None]
    return reference.select_topk(scores, allowed, topk)


def index_queries(q: torch.Tensor, layout: CacheLayout, cache_dtype: torch.dtype) -> torch.Tensor:
    """Indexer queries ``q`` [B, n, H, D] as the columns ``[B, D, n H]`` of the scoring GEMM, in its dtype: the
    cache's for a bf16 / fp16 ``auto`` cache (the keys are used as stored), else fp32 in the keys' numeric domain
    (``prepare_index_q``)."""
    batch, n, n_heads, dim = q.shape
    in_storage_dtype = layout.fmt == "auto" and cache_dtype in (torch.bfloat16, torch.float16)
    q = q.to(cache_dtype) if in_storage_dtype else prepare_index_q(q, layout)
    return q.reshape(batch, n * n_heads, dim).transpose(1, 2)


def index_scores(q_cols: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor, layout: CacheLayout) -> torch.Tensor:
    """fp32 index scores ``[B, n, t]`` of the queries ``q_cols`` (``index_queries``) with fp32 head weights
    ``weights`` [B, n, H] against ``B x t`` indexer cache rows: ``sum_h w_h ReLU(q_h . k D^-0.5)``.

    The GEMM is keys-major (``[B, t, D] @ [B, D, n H]``): with few query rows its long side is the keys', which runs
    2-3x faster here than ``[n H, D] @ [D, t]``. With a bf16 / fp16 cache it multiplies the stored keys in that dtype
    (fp32 accumulation; ~2.5x the fp32 GEMM's speed on this CPU, no fp32 copy of the keys) and each head's dot is
    rounded to that dtype: scores move by at most ~2^-9 of ``sum_h |w_h| ReLU(...)``, so a selection can differ from
    the fp32 reference's only among keys whose scores are that close to the top-k boundary."""
    batch, dim, _ = q_cols.shape
    n, n_heads = weights.shape[1], weights.shape[2]
    keys = (rows if q_cols.dtype == rows.dtype else read_index_rows(rows, layout)).view(batch, -1, dim)
    dots = torch.bmm(keys, q_cols).float().relu_()  # [B, t, n H]
    # D^-0.5 folded into the head weights (ReLU commutes with a positive scale): one pass over the dots fewer.
    return torch.einsum("btnh,bnh->bnt", dots.view(batch, -1, n, n_heads), weights * dim ** -0.5)


def _block_topk(q_cols: torch.Tensor, weights: torch.Tensor, index_cache: torch.Tensor, layout: CacheLayout,
                slot_table: torch.Tensor, kv_lens: torch.Tensor, k_out: int,
                key_tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-``k_out`` (positions, scores) ``[B, b, <= k_out]`` of one block of queries (``index_queries``
    columns, head weights [B, b, H]) over key tiles of ``key_tile`` positions; invisible positions score ``-inf``."""
    batch, n = weights.shape[:2]
    best_scores = weights.new_empty(batch, n, 0)
    best_positions = torch.empty(batch, n, 0, dtype=torch.long, device=weights.device)
    horizon = int(kv_lens.max())  # no query of the block sees a key past it
    fully_visible = int(kv_lens.min())
    for t0 in range(0, horizon, key_tile):
        t1 = min(horizon, t0 + key_tile)
        rows = index_cache.index_select(0, slot_table[:, t0:t1].flatten())
        scores = index_scores(q_cols, weights, rows, layout)  # [B, b, tile]
        positions = torch.arange(t0, t1, device=weights.device)
        if t1 > fully_visible:
            scores.masked_fill_(positions >= kv_lens[..., None], float("-inf"))
        best_positions, best_scores = merge_topk(best_positions, best_scores, positions, scores, k_out)
    return best_positions, best_scores


def merge_topk(best_positions: torch.Tensor, best_scores: torch.Tensor, positions: torch.Tensor,
               scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A running top-``k`` (positions, scores) ``[..., <= k]`` merged with one tile's scores ``[..., tile]`` at
    context ``positions`` [tile]: the top-``k`` of both (unsorted)."""
    best_scores = torch.cat((best_scores, scores), dim=-1)
    best_positions = torch.cat((best_positions, positions.expand(scores.shape)), dim=-1)
    if best_scores.shape[-1] > k:
        best_scores, chosen = best_scores.topk(k, dim=-1, sorted=False)
        best_positions = best_positions.gather(-1, chosen)
    return best_positions, best_scores


def mla_prefill(q_nope: torch.Tensor, q_pe: torch.Tensor, weights: MLAWeights, latent_cache: torch.Tensor,
                layout: CacheLayout, slots: torch.Tensor, positions: torch.Tensor,
                topk_positions: torch.Tensor | None, softmax_scale: float) -> torch.Tensor:
    """``reference.mla_prefill``'s contract (``[n, H, d_v]``). With a top-k selection, each query attends its selected
    rows only, in whichever form costs less for this chunk (``absorbed_is_cheaper``): the expanded (MHA) form over the
    rows some query of the chunk selected, up-projected once, or the absorbed (MQA) form over each query's own
    gathered latent rows (FlashMLA's sparse prefill; no up-projection at all). Either runs in query blocks whose
    transient tensors stay within a fixed budget."""
    if topk_positions is None:
        return reference.mla_prefill(q_nope, q_pe, weights, latent_cache, layout, slots, positions, None,
                                     softmax_scale)
    n, n_heads, nope_dim = q_nope.shape
    length = slots.shape[0]
    # Which positions some query selected, shifted by one so that the -1 padding lands on index 0: plain index ops
    # over the [n, k] selections (a boolean-mask gather of them took ~20x as long: 2048 x 2048 selections, ~0.2 s).
    shifted = (topk_positions + 1).flatten()
    is_selected = torch.zeros(length + 1, dtype=torch.bool, device=slots.device).index_fill_(0, shifted, True)
    is_selected[0] = False
    num_selected = int(is_selected.sum())
    if absorbed_is_cheaper(n, topk_positions.shape[1], num_selected, n_heads, nope_dim, weights.w_uv.shape[2],
                           layout):
        return _absorbed_prefill(q_nope, q_pe, weights, latent_cache, layout, slots, topk_positions, softmax_scale)
    selected = is_selected.nonzero()[:, 0] - 1  # sorted context positions some query chose
    # Padded with copies of the last one (columns no query selects: masked) to a bucketed count, so the GEMMs over
    # them keep their shapes from chunk to chunk.
    width = reference.bucketed_rows(num_selected) if num_selected else 0
    selected = torch.cat((selected, selected[-1:].expand(width - num_selected)))
    latent_rows, k_pe = read_latent_rows(latent_cache.index_select(0, slots[selected]), layout)
    kv = F.linear(latent_rows, weights.w_kvb).view(width, n_heads, -1)
    # Laid out once for the query blocks' batched GEMMs: keys [H, d_n + d_r, W] (the rope key shared by the heads,
    # so one product forms a block's scores) and values [H, W, d_v].
    keys = torch.cat((kv[..., :nope_dim], k_pe[:, None].expand(-1, n_heads, -1)), -1).permute(1, 2, 0).contiguous()
    values = kv[..., nope_dim:].transpose(0, 1).contiguous()
    queries = torch.cat((q_nope, q_pe), -1).transpose(0, 1)  # [H, n, d_n + d_r]
    # Each query's selection as columns of the selected rows, shifted by one: the padding's -1 lands on column 0,
    # which the bias drops (selections are causal: no further mask is needed).
    columns = torch.cumsum(is_selected, 0).index_select(0, shifted).view(topk_positions.shape)
    out = q_nope.new_empty(n_heads, n, values.shape[-1])
    query_block = max(1, TILE_ELEMENTS // (n_heads * max(1, width)))
    for q0 in range(0, n, query_block):
        rows = slice(q0, min(n, q0 + query_block))
        # The selection as an additive bias (0 on the selected columns, -inf elsewhere) that the scores' GEMM adds:
        # one pass fewer than masking the scores afterwards.
        bias = q_nope.new_full((rows.stop - q0, width + 1), float("-inf")).scatter_(-1, columns[rows], 0.0)[:, 1:]
        scores = torch.baddbmm(bias.expand(n_heads, -1, -1), queries[:, rows], keys, alpha=softmax_scale)
        torch.bmm(scores.softmax(-1, dtype=torch.float32).to(values.dtype), values, out=out[:, rows])
    return out.transpose(0, 1)


# What gathering one cached latent value for one query costs, in multiply-adds of a large GEMM: measured on 2 EPYC
# cores (16K context, 4 heads: 128 queries over their own 2048 gathered rows 0.7 s, against 0.28 s for the expanded
# form's 3.2G multiply-adds), ~48. Gathering, not arithmetic, dominates the absorbed form at few heads.
GATHERED_ELEMENT_COST = 48


def absorbed_is_cheaper(num_queries: int, topk: int, num_selected: int, n_heads: int, nope_dim: int, v_dim: int,
                        layout: CacheLayout) -> bool:
    """Whether ``num_queries`` queries attending ``topk`` rows each cost less in the absorbed form (per query: its
    rows gathered, then ``H x (2 r + d_r)`` multiply-adds a row) than in the expanded form (``num_selected`` rows
    up-projected to ``H x (d_n + d_v)``, then every query against all of them). Few heads and small chunks favour the
    absorbed form at long context (the union of a chunk's selections is then most of the context); a real V3.2
    (128 heads) always does."""
    r, rope = layout.kv_lora_rank, layout.rope_dim
    absorbed = num_queries * topk * ((r + rope) * GATHERED_ELEMENT_COST + n_heads * (2 * r + rope))
    expanded = num_selected * r * n_heads * (nope_dim + v_dim) + num_queries * num_selected * n_heads * (
        nope_dim + rope + v_dim)
    return absorbed < expanded


def _absorbed_prefill(q_nope: torch.Tensor, q_pe: torch.Tensor, weights: MLAWeights, latent_cache: torch.Tensor,
                      layout: CacheLayout, slots: torch.Tensor, topk_positions: torch.Tensor,
                      softmax_scale: float) -> torch.Tensor:
    """Each query over its own selected latent rows, as the absorbed decode attends them, in query blocks whose
    gathered rows ``[block, k, latent_width]`` stay within ``GATHER_ELEMENTS``."""
    n, topk = topk_positions.shape
    query_block = max(1, GATHER_ELEMENTS // (topk * layout.latent_width))
    outs = []
    for q0 in range(0, n, query_block):
        rows = slice(q0, min(n, q0 + query_block))
        block = topk_positions[rows]
        # Every query of the block shares the chunk's context; mla_decode reads only its selected rows.
        slot_table = slots[None].expand(block.shape[0], -1)
        outs.append(reference.mla_decode(q_nope[rows], q_pe[rows], weights, latent_cache, layout, slot_table,
                                         (block >= 0).sum(-1), block, softmax_scale))
    return torch.cat(outs)
