"""Plain-PyTorch references of every hot op: the CPU backend (but for the long-context ops ``indexer_topk`` and
``mla_prefill``, which it runs tiled, ``dsv32.kernels.tiled``), and the ground truth every backend is tested on.

Two levels live here:

* **model-level ops** (``indexer_topk``, ``mla_decode``, ``mla_prefill``, ``fused_moe``, ``rms_norm``): exactly the
  computation the model did inline before it routed through ``dsv32.kernels`` (same ops, same order, so CPU outputs
  are bit-identical); the Triton backend implements the same signatures.
* **kernel-level ops** (``indexer_scores``, ``sparse_mla_attention``): the plain semantics of one Triton kernel, on
  the raw paged cache rows, used by the kernel tests.

Cache rows are raw paged-cache storage (``auto``: compute dtype; ``fp8``: bytes, see ``dsv32.kernels.cache_format``);
the context of a query is given by cache *slots*, and top-k selections by context *positions* padded with ``-1``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from dsv32.kernels.cache_format import CacheLayout, prepare_index_q, read_index_rows, read_latent_rows
from dsv32.kernels.fp8 import dequantize_block_fp8
from dsv32.kernels.quant import PackedIntWeight, int_linear

if TYPE_CHECKING:
    from dsv32.kernels.attention import MLAWeights

# ---- GEMM shape buckets -----------------------------------------------------------------------------------------


def bucketed_rows(n: int) -> int:
    """``n`` rounded up to a multiple of ``max(16, 2^(bits(n) - 4))`` (at most ~12% more rows from 128 up): a row
    count that varies with the data (an expert group, the union of a chunk's selections) would give oneDNN a new GEMM
    shape at every step, each built in ~0.7-1 ms and pushing the other steps' shapes out of its bounded primitive
    cache (``lifetime.DEFAULT_ONEDNN_PRIMITIVE_CACHE``). Padded rows must be ones the result ignores."""
    granule = max(16, 1 << max(0, n.bit_length() - 4))
    return -(-n // granule) * granule


# ---- paged cache rows -------------------------------------------------------------------------------------------


def positions_to_mask(positions: torch.Tensor, length: int) -> torch.Tensor:
    """Top-k context positions ``[..., k]`` (``-1`` = none) -> boolean mask ``[..., length]``."""
    target = torch.where(positions < 0, length, positions)
    mask = torch.zeros(*positions.shape[:-1], length + 1, dtype=torch.bool, device=positions.device)
    return mask.scatter_(-1, target, True)[..., :length]


def positions_to_slots(positions: torch.Tensor, slot_table: torch.Tensor) -> torch.Tensor:
    """Context positions ``[B, n, k]`` (``-1`` = none) of sequences with slot tables ``[B, L]`` -> cache slots,
    ``-1`` kept."""
    batch, n, k = positions.shape
    gathered = slot_table.gather(1, positions.clamp(min=0).reshape(batch, n * k)).view(batch, n, k)
    return torch.where(positions < 0, -1, gathered)


# ---- lightning indexer --------------------------------------------------------------------------------------------


def indexer_scores(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``q`` [B, n, H, D] and ``keys`` [B, L, D] (same numeric domain), ``weights`` [B, n, H] -> [B, n, L] fp32:
    ``sum_h w_h * ReLU(q_h . k * D^-0.5)``, as two batched GEMMs."""
    batch, n, n_heads, dim = q.shape
    dots = torch.bmm(q.float().reshape(batch, n * n_heads, dim), keys.float().transpose(1, 2))
    dots = dots.view(batch, n, n_heads, -1).mul_(dim ** -0.5).relu_()
    return torch.matmul(weights.float()[:, :, None, :], dots)[:, :, 0]


def select_topk(scores: torch.Tensor, allowed: torch.Tensor, topk: int) -> torch.Tensor:
    """Positions of the ``topk`` best allowed scores per row ``[..., min(topk, L)]``, in no particular order; ``-1``
    where fewer are allowed."""
    scores = scores.masked_fill(~allowed, float("-inf"))
    # A branch, not ``min()``: compiled over a dynamic width, ``min`` stays symbolic and so does every shape after
    # it (the selected rows' GEMMs then fall back to ATen's, ~45 us each here); the branch guards on the comparison
    # and keeps the selection's shape static (the decode graphs' width always exceeds the top-k).
    chosen = scores.topk(topk if scores.shape[-1] >= topk else scores.shape[-1], dim=-1, sorted=False).indices
    return torch.where(allowed.gather(-1, chosen), chosen, -1)


def indexer_topk(q: torch.Tensor, weights: torch.Tensor, index_cache: torch.Tensor, layout: CacheLayout,
                 slot_table: torch.Tensor, kv_lens: torch.Tensor, topk: int) -> torch.Tensor:
    """Index scores of queries ``q`` [B, n, H, D] (post-RoPE, unrotated) with head weights [B, n, H] against the
    keys at ``slot_table`` [B, L]; query ``(b, i)`` sees positions ``< kv_lens[b, i]``. Returns the top-k context
    positions ``[B, n, min(topk, L)]`` (``-1`` padded)."""
    batch, length = slot_table.shape
    keys = read_index_rows(index_cache.index_select(0, slot_table.flatten()), layout).view(batch, length, -1)
    scores = indexer_scores(prepare_index_q(q, layout), weights, keys)
    allowed = torch.arange(length, device=q.device) < kv_lens[..., None]
    return select_topk(scores, allowed, topk)


# ---- MLA attention ----------------------------------------------------------------------------------------------


def sparse_mla_attention(q: torch.Tensor, latent_cache: torch.Tensor, layout: CacheLayout, kv_slots: torch.Tensor,
                         kv_lens: torch.Tensor, softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed (MQA) attention, the Triton kernel's semantics. ``q`` [N, H, r + d_r] = ``[W_UK^T q_nope ; q_pe]``;
    query ``i`` attends the cache slots ``kv_slots[i, :kv_lens[i]]`` (``-1`` entries skipped) with 576-wide keys
    ``[c ; k_pe]`` and 512-wide values ``c``. Returns ``(o [N, H, r] in q's dtype, lse [N, H] fp32)``; a query with
    no key gets ``o = 0``, ``lse = -inf``."""
    n, length = kv_slots.shape
    c, k_pe = read_latent_rows(latent_cache.index_select(0, kv_slots.clamp(min=0).flatten()), layout)
    keys = torch.cat((c, k_pe), dim=-1).float().view(n, length, -1)
    values = c.float().view(n, length, -1)
    scores = torch.einsum("nhe,nle->nhl", q.float(), keys) * softmax_scale
    valid = (kv_slots >= 0) & (torch.arange(length, device=q.device) < kv_lens[:, None])
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    lse = scores.logsumexp(-1)
    probs = torch.exp(scores - lse[..., None].clamp(min=torch.finfo(torch.float32).min)).nan_to_num(0.0)
    return torch.einsum("nhl,nlr->nhr", probs, values).to(q.dtype), lse


def mla_decode(q_nope: torch.Tensor, q_pe: torch.Tensor, weights: MLAWeights, latent_cache: torch.Tensor,
               layout: CacheLayout, slot_table: torch.Tensor, kv_lens: torch.Tensor,
               topk_positions: torch.Tensor | None, softmax_scale: float) -> torch.Tensor:
    """Weight-absorbed attention of one query per sequence. ``q_nope`` [B, H, d_n], ``q_pe`` [B, H, d_r] (absorbed
    weights ``weights.w_uk`` / ``w_uv``); contexts ``slot_table`` [B, L] of lengths ``kv_lens`` [B], optionally
    restricted to ``topk_positions`` [B, k] (then only those rows are read). Returns ``[B, H, d_v]``."""
    if topk_positions is None:
        slots = slot_table
        allowed = torch.arange(slot_table.shape[1], device=slot_table.device) < kv_lens[:, None]
    else:
        slots = positions_to_slots(topk_positions[:, None], slot_table)[:, 0].clamp(min=0)
        allowed = topk_positions >= 0
    batch, length = slots.shape
    rows = latent_cache.index_select(0, slots.flatten())
    q_abs = weights.absorb(q_nope)  # [B, H, r]
    if layout.fmt == "auto":  # a cache row is [c ; k_pe]: one GEMM against [q_abs ; q_pe]
        # The values are the rows' first r columns: multiplying the whole rows and dropping the k_pe columns of
        # the product costs less than copying the strided slice for the GEMM.
        values = keys = rows.view(batch, length, -1)
        scores = torch.bmm(keys, torch.cat((q_abs, q_pe), dim=-1).transpose(1, 2))
    else:
        c, k_pe = read_latent_rows(rows, layout)
        values, k_pe = c.view(batch, length, -1), k_pe.view(batch, length, -1)
        scores = torch.bmm(values, q_abs.transpose(1, 2)) + torch.bmm(k_pe, q_pe.transpose(1, 2))
    # Keys-major products ([B, L, H], used transposed): with the keys as the GEMM's left operand, a compiled graph
    # does not copy the gathered rows into a transposed layout first (0.7 ms for 2048 x 576 rows here).
    scores = scores.transpose(1, 2).float().mul_(softmax_scale).masked_fill_(~allowed[:, None, :], float("-inf"))
    probs = scores.softmax(-1).to(values.dtype)
    o_latent = torch.bmm(probs, values)[..., :layout.kv_lora_rank]  # [B, H, r]
    return weights.unabsorb(o_latent)


def mla_prefill(q_nope: torch.Tensor, q_pe: torch.Tensor, weights: MLAWeights, latent_cache: torch.Tensor,
                layout: CacheLayout, slots: torch.Tensor, positions: torch.Tensor,
                topk_positions: torch.Tensor | None, softmax_scale: float) -> torch.Tensor:
    """Non-absorbed ("MHA mode") causal attention of ``n`` queries of one sequence (``q_nope`` [n, H, d_n], ``q_pe``
    [n, H, d_r], absolute ``positions`` [n]) over its context ``slots`` [L], optionally restricted to
    ``topk_positions`` [n, k]. Returns ``[n, H, d_v]``.

    With a top-k restriction only the context rows some query selected are read from the cache and up-projected
    (at most ``n * k`` of ``L``); the others are zeros that the mask removes. A short chunk at long context then no
    longer pays for expanding the whole context's latents (tiny model, 64K context: ~0.1 s a layer). In bf16 each
    row's product is the one the whole-context expansion gives (oneDNN), so the result is bit-identical to
    ``mla_prefill_expand_all``, this op's plain form; in fp32, MKL's few-row paths may round a product differently
    (agreement to rounding). Tested in ``tests/kernels/test_attention.py``."""
    if topk_positions is None:
        return mla_prefill_expand_all(q_nope, q_pe, weights, latent_cache, layout, slots, positions, None,
                                      softmax_scale)
    length = slots.shape[0]
    needed = torch.unique(topk_positions[topk_positions >= 0])
    latent_rows, k_pe_rows = read_latent_rows(latent_cache.index_select(0, slots[needed]), layout)
    kv = latent_rows.new_zeros(length, weights.w_kvb.shape[0])
    kv[needed] = F.linear(latent_rows, weights.w_kvb)
    k_pe = k_pe_rows.new_zeros(length, k_pe_rows.shape[-1])
    k_pe[needed] = k_pe_rows
    return mha_attention(q_nope, q_pe, kv, k_pe, causal_mask(positions, length, topk_positions), softmax_scale)


def mla_prefill_expand_all(q_nope: torch.Tensor, q_pe: torch.Tensor, weights: MLAWeights,
                           latent_cache: torch.Tensor, layout: CacheLayout, slots: torch.Tensor,
                           positions: torch.Tensor, topk_positions: torch.Tensor | None,
                           softmax_scale: float) -> torch.Tensor:
    """``mla_prefill``'s plain form: up-projects every context latent, selected or not."""
    latent, k_pe = read_latent_rows(latent_cache.index_select(0, slots), layout)
    return mha_attention(q_nope, q_pe, F.linear(latent, weights.w_kvb), k_pe,
                         causal_mask(positions, slots.shape[0], topk_positions), softmax_scale)


def mha_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor,
                  allowed: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """Non-absorbed attention of queries ``q_nope`` [n, H, d_n], ``q_pe`` [n, H, d_r] over expanded context rows
    ``kv`` [L, H * (d_n + d_v)] and rope keys ``k_pe`` [L, d_r], query ``i`` attending the rows ``allowed[i]``
    ([n, L] bool). Returns ``[n, H, d_v]``."""
    n_heads, nope_dim = q_nope.shape[1], q_nope.shape[2]
    length = kv.shape[0]
    kv = kv.view(length, n_heads, -1)
    k_nope, v = kv[..., :nope_dim], kv[..., nope_dim:]
    scores = (torch.einsum("nhd,lhd->hnl", q_nope, k_nope)
              + torch.einsum("nhr,lr->hnl", q_pe, k_pe)) * softmax_scale
    probs = scores.float().masked_fill(~allowed, float("-inf")).softmax(-1).to(v.dtype)
    return torch.einsum("hnl,lhv->nhv", probs, v)


def causal_mask(positions: torch.Tensor, length: int, topk_positions: torch.Tensor | None) -> torch.Tensor:
    """``[n, length]``: the context positions each query at ``positions`` [n] may attend, optionally restricted to
    its ``topk_positions`` [n, k]."""
    allowed = torch.arange(length, device=positions.device)[None, :] <= positions[:, None]
    if topk_positions is not None:
        allowed = allowed & positions_to_mask(topk_positions, length)
    return allowed


# ---- linear layers ----------------------------------------------------------------------------------------------


# Weights at least this large (elements) are multiplied weight-major on CPU (see ``matmul_wt``).
WEIGHT_MAJOR_MIN_NUMEL = 1 << 21


def matmul_wt(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``y = x @ W^T`` (``W`` [N, K] in ``x``'s dtype). On CPU, for a large ``W`` (the 129280-row LM head),
    ``W @ x^T`` streams the weight once in its stored row-major order and runs up to 2x faster than ``x @ W^T``;
    for small weights ``F.linear`` is faster (measured on 2 AVX2 cores: 12-50 us against 15-68 us at 8 rows)."""
    # Compiled graphs take ``F.linear``: Inductor lays the (frozen) weight out for its own GEMM.
    if (x.device.type == "cpu" and x.dim() == 2 and weight.numel() >= WEIGHT_MAJOR_MIN_NUMEL
            and not torch.compiler.is_compiling()):
        return torch.mm(weight, x.t()).t()
    return F.linear(x, weight)


def prepack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """``W`` [N, K] reordered once into oneDNN's blocked layout for ``packed_linear`` (a new, opaque ``mkldnn``
    tensor beside ``W``), where that pays: a bf16 weight on a CPU whose oneDNN has bf16 kernels (AVX512-BF16 / AMX).
    ``F.linear`` on a plain bf16 weight reorders it on every call; the packed product gives the same bits, faster
    (measured on 2 Sapphire Rapids cores: 18-20 us against 20-30 us for the tiny model's projections at 1-8 rows,
    1.4 ms against 2.4-2.9 ms for its 256 x 129280 LM head). ``None`` where it does not apply (fp32 weights go to
    MKL's sgemm, faster still for small products)."""
    if (weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or weight.dim() != 2
            or not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight)


def packed_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``y = x @ W^T`` for ``x`` [..., K] in ``W``'s dtype and ``packed`` = ``prepack_weight(W)``: bit-identical to
    ``F.linear(x, W)``."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``y = x @ W^T`` in ``x``'s dtype for an e4m3 ``W`` [N, K] with one fp32 multiplier per ``block``:
    ``W[n, k] = W_fp8[n, k] * scale_inv[n // block[0], k // block[1]]`` (partial edge blocks allowed), dequantised to
    ``x``'s dtype first: exactly what dequantising on load and a dense ``matmul_wt`` compute."""
    return matmul_wt(x, dequantize_block_fp8(weight, scale_inv, block, x.dtype))


# ---- MoE --------------------------------------------------------------------------------------------------------


def dequantize_experts(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Stacked e4m3 expert weights ``[E, N, K]`` with 128x128 block multipliers ``[E, N/128, K/128]`` -> ``dtype``."""
    return torch.stack([dequantize_block_fp8(w, s, dtype=dtype) for w, s in zip(weight, scale, strict=True)])


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, w13_scale: torch.Tensor | None = None,
              w2_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Routed experts: ``out[t] = sum_j w[t, j] * W2_e (silu(W1_e x_t) * W3_e x_t)``, ``e = topk_ids[t, j]``, fp32
    ``[T, H]``. ``w13`` [E, 2I, H] (gate rows then up rows), ``w2`` [E, H, I]; e4m3 weights come with their 128x128
    block multipliers and are dequantised to ``x``'s dtype. Tokens are grouped by expert, one GEMM pair each, into
    one buffer, and combined once at the end (no scatter over the hidden state per expert)."""
    if w13_scale is not None:
        w13 = dequantize_experts(w13, w13_scale, x.dtype)
    if w2_scale is not None:
        w2 = dequantize_experts(w2, w2_scale, x.dtype)
    num_experts = w13.shape[0]

    def run(xs: torch.Tensor, sorted_ids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if num_experts * int(counts.max()) <= MOE_PADDING_FACTOR * xs.shape[0]:
            return _experts_padded(xs, w13, w2, sorted_ids, counts)
        return _experts_looped(xs, lambda e, rows: F.linear(rows, w13[e]), lambda e, rows: rows @ w2[e].t(),
                               w2.shape[1], counts.tolist())

    return _grouped_by_expert(x, topk_weights, topk_ids, num_experts, run)


def fused_moe_int(x: torch.Tensor, w13: PackedIntWeight, w2: PackedIntWeight, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor) -> torch.Tensor:
    """``fused_moe`` for experts held as INT8 / INT4 stacks in the ``cpu`` layout (``dsv32.kernels.quant``): the same
    grouping, one packed integer GEMM pair per expert that got tokens."""
    num_experts = w13.data.shape[0]

    def run(xs: torch.Tensor, sorted_ids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return _experts_looped(xs, lambda e, rows: int_linear(rows, w13.expert(e)),
                               lambda e, rows: int_linear(rows, w2.expert(e)), w2.out_features, counts.tolist())

    return _grouped_by_expert(x, topk_weights, topk_ids, num_experts, run)


def _grouped_by_expert(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, num_experts: int,
                       run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Sort the (token, expert) pairs by expert, ``run(rows, their expert ids, rows per expert)`` them through their
    experts, and combine each token's ``k`` outputs with its routing weights: fp32 ``[T, H]``."""
    num_tokens, top_k = topk_ids.shape
    flat_ids = topk_ids.flatten()
    order = flat_ids.argsort(stable=True)
    counts = torch.bincount(flat_ids, minlength=num_experts)
    xs = x[order // top_k]  # the (token, expert) pairs' inputs, grouped by expert
    ys = run(xs, flat_ids[order], counts)
    # Back to (token, j) order, then each token's weighted sum of its k expert outputs as one batched GEMM.
    y = torch.empty_like(ys).index_copy_(0, order, ys).view(num_tokens, top_k, -1)
    return torch.bmm(topk_weights.float()[:, None, :], y.float())[:, 0]


def fused_moe_fixed_shape(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                          topk_ids: torch.Tensor, w13_scale: torch.Tensor | None = None,
                          w2_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``fused_moe``'s result with shapes that depend only on ``T`` (no sort, count or host sync: what a captured
    decode graph can hold); ids outside ``[0, E)`` contribute nothing (expert parallel: another rank's experts).
    Few pairs (``T * k <= E``, a decode at small batch): each (token, expert) pair gathers its expert's weights, so
    only the routed experts are read, one batched GEMM pair over the pairs. More pairs: every expert runs every
    token and a dense ``[T, E]`` routing matrix (zero where not routed) combines them, each expert read once."""
    num_tokens, top_k = topk_ids.shape
    num_experts = w13.shape[0]
    routed = (topk_ids >= 0) & (topk_ids < num_experts)
    ids = topk_ids.clamp(0, num_experts - 1)
    weights = topk_weights.float() * routed
    if num_tokens * top_k <= num_experts:
        flat = ids.flatten()
        g13, g2 = w13[flat], w2[flat]
        if w13_scale is not None:
            g13 = dequantize_experts(g13, w13_scale[flat], x.dtype)
        if w2_scale is not None:
            g2 = dequantize_experts(g2, w2_scale[flat], x.dtype)
        h = torch.bmm(x.repeat_interleave(top_k, dim=0)[:, None, :], g13.transpose(1, 2))
        y = torch.bmm(_swiglu(h), g2.transpose(1, 2)).view(num_tokens, top_k, -1)
        return torch.bmm(weights[:, None, :], y.float())[:, 0]
    if w13_scale is not None:
        w13 = dequantize_experts(w13, w13_scale, x.dtype)
    if w2_scale is not None:
        w2 = dequantize_experts(w2, w2_scale, x.dtype)
    dense = weights.new_zeros(num_tokens, num_experts).scatter_add_(1, ids, weights)
    h = torch.bmm(x[None].expand(num_experts, -1, -1), w13.transpose(1, 2))  # [E, T, 2I]
    y = torch.bmm(_swiglu(h), w2.transpose(1, 2))  # [E, T, H]
    return torch.einsum("te,eth->th", dense, y.float())


def fused_moe_int_fixed_shape(x: torch.Tensor, w13: PackedIntWeight, w2: PackedIntWeight,
                              topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """``fused_moe_fixed_shape`` for INT8 / INT4 expert stacks: one token (the batch-1 graph), each of its ``k``
    pairs reads its expert's packed codes as views (``_expert_indices``); more tokens, every expert runs every token,
    combined densely (the integer kernels take one 2-D weight each, so the pairs of a batch whose size is symbolic
    in the graph cannot be looped over; ``T == 1`` is decided by the shape's range, adding no guard)."""
    num_tokens, top_k = topk_ids.shape
    num_experts = w13.data.shape[0]
    routed = (topk_ids >= 0) & (topk_ids < num_experts)
    ids = topk_ids.clamp(0, num_experts - 1)
    weights = topk_weights.float() * routed
    if num_tokens == 1 and top_k <= num_experts:
        ys = [int_linear(_swiglu(int_linear(x, w13.expert(e))), w2.expert(e))
              for e in _expert_indices(ids, num_experts)]
        y = torch.cat(ys).view(num_tokens, top_k, -1)
        return torch.bmm(weights[:, None, :], y.float())[:, 0]
    dense = weights.new_zeros(num_tokens, num_experts).scatter_add_(1, ids, weights)
    y = torch.stack([int_linear(_swiglu(int_linear(x, w13.expert(e))), w2.expert(e)) for e in range(num_experts)])
    return torch.einsum("te,eth->th", dense, y.float())


def _expert_indices(ids: torch.Tensor, num_experts: int) -> list[int]:
    """One token's expert ids ``[1, k]`` (within ``[0, E)``) as integers. In a captured graph they are data-dependent
    symbols (Dynamo's ``capture_scalar_outputs``, which the decode graphs turn on), bounded here so that indexing an
    expert stack by one selects a view of its weights; indexed by a tensor, Dynamo would read the value and break
    the graph at every MoE layer."""
    indices = ids.flatten().tolist()
    for e in indices:
        torch._check(e >= 0)
        torch._check(e < num_experts)
    return indices


# Routed experts run as one padded batched GEMM pair when that wastes at most this factor of rows (dense routing:
# few experts, many tokens each); else one GEMM pair per expert that got tokens.
MOE_PADDING_FACTOR = 4


def _swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def _experts_padded(xs: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, sorted_ids: torch.Tensor,
                    counts: torch.Tensor) -> torch.Tensor:
    """Expert-grouped rows ``xs`` [P, H] (expert ids ``sorted_ids``) through their experts, every expert's group
    padded to the largest (``bucketed_rows``): ``[E, rows, H]`` batched GEMMs."""
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(xs.shape[0], device=xs.device) - starts[sorted_ids]
    padded = xs.new_zeros(w13.shape[0], bucketed_rows(int(counts.max())), xs.shape[1])  # zero rows: ignored
    padded[sorted_ids, rank] = xs
    out = torch.bmm(_swiglu(torch.bmm(padded, w13.transpose(1, 2))), w2.transpose(1, 2))
    return out[sorted_ids, rank]


def _experts_looped(xs: torch.Tensor, gate_up: Callable[[int, torch.Tensor], torch.Tensor],
                    down: Callable[[int, torch.Tensor], torch.Tensor], hidden: int, counts: list[int]) -> torch.Tensor:
    """Expert-grouped rows ``xs`` [P, H] through their experts, one GEMM pair per expert that has rows
    (``gate_up(e, rows)`` / ``down(e, rows)``: expert ``e``'s two projections)."""
    ys = torch.empty(xs.shape[0], hidden, dtype=xs.dtype, device=xs.device)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        end = start + count
        ys[start:end] = down(expert, _swiglu(gate_up(expert, xs[start:end])))
        start = end
    return ys


# ---- RMSNorm ----------------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual`` (rounded to ``x``'s dtype; ``h = x`` without a residual) and ``RMSNorm(h)`` as
    ``dsv32.model.norm`` defines it: ``w * (h / rms(h))`` in fp32, rounded to ``h``'s dtype before and after the
    weight. Returns ``(normed, h)``."""
    h = x if residual is None else x + residual
    y = torch.rms_norm(h.float(), (h.shape[-1],), eps=eps)  # x * rsqrt(mean(x^2) + eps) in fp32, one call
    return (y.to(h.dtype) * weight).to(h.dtype), h
