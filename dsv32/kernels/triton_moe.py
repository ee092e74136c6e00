"""Triton fused MoE: grouped GEMMs over the routed (token, expert) pairs, expert weights in the compute dtype, FP8
block-scaled, or INT8 / INT4 codes (``dsv32.kernels.quant``'s ``triton`` layout).

1. ``align_pairs`` sorts the ``T * k`` pairs by expert and pads every expert's run to a multiple of ``BLOCK_M``, so
   each ``BLOCK_M`` rows of ``sorted_pairs`` belong to one expert (``block_expert``). It is built with device ops
   only (no ``.item()``/``.tolist()``), sized for the worst case, so it can be captured in a CUDA graph; unused blocks
   carry expert ``-1`` and their programs exit at once.
2. ``gate_up``: ``h[pair] = silu(W1_e x_tok) * (W3_e x_tok)``: one program computes the matching gate and up column
   tiles and applies SwiGLU in its epilogue, so the ``[pairs, 2I]`` intermediate is never written.
3. ``down``: ``y[pair] = w_pair * W2_e h[pair]`` in fp32, then ``out[t] = sum_j y[t, j]`` (deterministic, no atomics).

FP8 weights stay e4m3 in memory with one fp32 multiplier per 128x128 block; a ``BLOCK_K`` tile (which divides 128)
lies inside one scale column, so each K step does ``acc += dot(a, w) * scale[n_block]`` (W8A16: activations stay in
the compute dtype). Integer experts take the same step with their own multipliers: INT8 one per output row, INT4 one
per row and group (the step divides the group; the codes, two a byte, minus their zero are small integers, exact in
the dot type). GPTQ act order reads each expert's activation columns in its packed order; W8A8 experts get their
activations rounded to int8 per row first, the row scales applied in the epilogue.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dsv32.kernels.quant import TRITON_LAYOUT, PackedIntWeight, quantize_activations_int8
from dsv32.kernels.triton_common import check_device, dot_precision, dot_type

SCALE_BLOCK = 128
MIN_BLOCK_K = 16  # the smallest K step tl.dot takes


@triton.jit
def _weight_product(a, w_base, s_base, z_base, rows, rows_ok, k, k_ok, k0, stride_w_n, stride_w_k, stride_s_n,
                    stride_s_k, SCALED: tl.constexpr, INT4: tl.constexpr, HAS_ZERO: tl.constexpr,
                    SCALE_ROWS: tl.constexpr, SCALE_COLS: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):
    """``a @ W[rows, k]^T`` for one ``BLOCK_K`` step, times the step's multiplier per row when SCALED (FP8 block,
    INT8 channel or INT4 group: a step lies in one). INT4 codes are read two a byte and their zero subtracted
    (small integers, exact in the dot type)."""
    mask = k_ok[:, None] & rows_ok[None, :]
    scale_at = (rows // SCALE_ROWS) * stride_s_n + (k0 // SCALE_COLS) * stride_s_k
    if INT4:
        byte = tl.load(w_base + rows[None, :] * stride_w_n + (k // 2)[:, None] * stride_w_k, mask=mask, other=0)
        w = ((byte.to(tl.int32) >> ((k % 2) * 4)[:, None]) & 15).to(tl.float32)
        if HAS_ZERO:
            w -= tl.load(z_base + scale_at, mask=rows_ok, other=0.0)[None, :]
        else:
            w -= 8.0
    else:
        w = tl.load(w_base + rows[None, :] * stride_w_n + k[:, None] * stride_w_k, mask=mask, other=0.0)
    part = tl.dot(a, w.to(DOT), input_precision=PRECISION)
    if SCALED:
        part *= tl.load(s_base + scale_at, mask=rows_ok, other=0.0)[None, :]
    return part


@triton.jit
def _grouped_gemm_kernel(a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, w_zero_ptr, perm_ptr, out_ptr, sorted_pairs_ptr,
                         block_expert_ptr, pair_weight_ptr, num_pairs, n_out, k_in, a_rows_per_pair,
                         stride_a_row, stride_w_expert, stride_w_n, stride_w_k,
                         stride_s_expert, stride_s_n, stride_s_k, stride_perm_expert, stride_out_row,
                         GATED: tl.constexpr, WEIGHTED: tl.constexpr, SCALED: tl.constexpr, INT4: tl.constexpr,
                         HAS_ZERO: tl.constexpr, HAS_PERM: tl.constexpr, A_SCALED: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         SCALE_ROWS: tl.constexpr, SCALE_COLS: tl.constexpr, DOT: tl.constexpr,
                         PRECISION: tl.constexpr):
    """``out[pair, n] = A[pair // a_rows_per_pair] @ W_e[n]`` for ``n < n_out``; GATED: ``W_e`` has ``2 n_out``
    rows (gate then up) and ``out = silu(gate) * up``; WEIGHTED: times ``pair_weight[pair]``. HAS_PERM: ``A``'s
    columns are read in expert ``e``'s act order; A_SCALED: ``A`` holds int8 codes, each row times its scale."""
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if expert < 0:
        return
    pairs = tl.load(sorted_pairs_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
    pair_ok = pairs < num_pairs
    a_rows = tl.where(pair_ok, pairs // a_rows_per_pair, 0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < n_out
    kk = tl.arange(0, BLOCK_K)
    w_base = w_ptr + expert.to(tl.int64) * stride_w_expert
    s_base = w_scale_ptr + expert.to(tl.int64) * stride_s_expert
    z_base = w_zero_ptr + expert.to(tl.int64) * stride_s_expert
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_in, BLOCK_K):
        k = k0 + kk
        k_ok = k < k_in
        a_cols = k
        if HAS_PERM:
            a_cols = tl.load(perm_ptr + expert.to(tl.int64) * stride_perm_expert + k, mask=k_ok, other=0)
        a = tl.load(a_ptr + a_rows[:, None] * stride_a_row + a_cols[None, :], mask=pair_ok[:, None] & k_ok[None, :],
                    other=0.0).to(DOT)
        acc += _weight_product(a, w_base, s_base, z_base, n, n_ok, k, k_ok, k0, stride_w_n, stride_w_k, stride_s_n,
                               stride_s_k, SCALED, INT4, HAS_ZERO, SCALE_ROWS, SCALE_COLS, DOT, PRECISION)
        if GATED:
            acc_up += _weight_product(a, w_base, s_base, z_base, n + n_out, n_ok, k, k_ok, k0, stride_w_n, stride_w_k,
                                      stride_s_n, stride_s_k, SCALED, INT4, HAS_ZERO, SCALE_ROWS, SCALE_COLS, DOT,
                                      PRECISION)
    if A_SCALED:
        a_scale = tl.load(a_scale_ptr + a_rows, mask=pair_ok, other=0.0)[:, None]
        acc *= a_scale
        acc_up *= a_scale
    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    if WEIGHTED:
        acc *= tl.load(pair_weight_ptr + pairs, mask=pair_ok, other=0.0)[:, None]
    out_ptrs = out_ptr + pairs.to(tl.int64)[:, None] * stride_out_row + n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=pair_ok[:, None] & n_ok[None, :])


def align_pairs(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sorted_pairs [num_blocks * block_m], block_expert [num_blocks])``: pair ids (``t * k + j``) grouped by
    expert, each expert's run padded to ``block_m`` with the sentinel ``T * k``; blocks past the last used one get
    expert ``-1``. ``num_blocks = cdiv(T k, block_m) + min(E, T k)`` bounds what any routing needs."""
    flat = topk_ids.flatten().long()
    num_pairs = flat.numel()
    device = flat.device
    num_blocks = triton.cdiv(num_pairs, block_m) + min(num_experts, num_pairs)
    order = flat.argsort(stable=True)
    # scatter_add, not bincount: CUDA bincount reads the max id back to the host, which breaks graph capture
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    rank = torch.arange(num_pairs, device=device) - (counts.cumsum(0) - counts)[flat[order]]
    sorted_pairs = torch.full((num_blocks * block_m,), num_pairs, dtype=torch.int64, device=device)
    sorted_pairs[(padded_end - padded)[flat[order]] + rank] = order
    block_start = torch.arange(num_blocks, device=device) * block_m
    block_expert = torch.searchsorted(padded_end, block_start, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1)
    return sorted_pairs, block_expert


@dataclass(frozen=True)
class _ExpertStack:
    """One stacked expert projection as the kernel reads it: ``data`` ``[E, N, K]`` (INT4: ``[E, N, K / 2]``),
    ``scale`` (and INT4 ``zero``) indexed ``[e, n // scale_rows, k // scale_cols]`` (None: plain weights), ``perm``
    ``[E, K]`` each expert's act-order column order, ``act_quant``: activations rounded to int8 per row."""

    data: torch.Tensor
    in_features: int
    scale: torch.Tensor | None = None
    scale_rows: int = 1
    scale_cols: int = 1
    int4: bool = False
    zero: torch.Tensor | None = None
    perm: torch.Tensor | None = None
    act_quant: bool = False

    @classmethod
    def of(cls, weight: torch.Tensor, scale: torch.Tensor | None) -> _ExpertStack:
        """A compute-dtype stack, or an e4m3 one with its 128x128 block multipliers."""
        return cls(weight, weight.shape[2], scale, SCALE_BLOCK, SCALE_BLOCK)

    @classmethod
    def of_int(cls, weight: PackedIntWeight) -> _ExpertStack:
        """An INT8 (one multiplier per row: ``[E, N, 1]``) or INT4 (per group) stack in the ``triton`` layout."""
        if weight.layout != TRITON_LAYOUT:
            raise ValueError(f"the Triton INT MoE takes experts packed in the {TRITON_LAYOUT!r} layout, not "
                             f"{weight.layout!r}")
        if weight.bits == 8:
            return cls(weight.data, weight.in_features, weight.scales[..., None], 1, weight.in_features,
                       perm=weight.perm, act_quant=weight.act_quant)
        return cls(weight.data, weight.in_features, weight.scales, 1, weight.group_size, True, weight.zeros,
                   weight.perm)


def _launch(a: torch.Tensor, w: _ExpertStack, out: torch.Tensor, sorted_pairs: torch.Tensor,
            block_expert: torch.Tensor, pair_weights: torch.Tensor, num_pairs: int, a_rows_per_pair: int, gated: bool,
            weighted: bool, block_m: int, block_n: int, block_k: int) -> None:
    n_out = w.data.shape[1] // 2 if gated else w.data.shape[1]
    a_scale = None
    if w.act_quant:
        codes, row_scale = quantize_activations_int8(a)  # int8 values are exact in the compute dtype
        a, a_scale = codes.to(a.dtype), row_scale.reshape(-1)
    scaled = w.scale is not None
    if scaled and w.scale_cols < w.in_features:  # a K step must not straddle two multipliers
        block_k = math.gcd(block_k, w.scale_cols)
        if block_k < MIN_BLOCK_K:
            raise ValueError(f"the weights' multipliers change every {w.scale_cols} columns: the K step must be a "
                             f"multiple of {MIN_BLOCK_K} dividing that")
    scale = w.scale if scaled else w.data
    zero = w.zero if w.zero is not None else scale
    perm = w.perm if w.perm is not None else sorted_pairs
    grid = (block_expert.numel(), triton.cdiv(n_out, block_n))
    _grouped_gemm_kernel[grid](
        a, a_scale if a_scale is not None else pair_weights, w.data, scale, zero, perm, out, sorted_pairs,
        block_expert, pair_weights, num_pairs, n_out, w.in_features, a_rows_per_pair,
        a.stride(0), w.data.stride(0), w.data.stride(1), w.data.stride(2), scale.stride(0), scale.stride(1),
        scale.stride(2), perm.stride(0), out.stride(0),
        GATED=gated, WEIGHTED=weighted, SCALED=scaled, INT4=w.int4, HAS_ZERO=w.zero is not None,
        HAS_PERM=w.perm is not None, A_SCALED=a_scale is not None, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, SCALE_ROWS=w.scale_rows, SCALE_COLS=w.scale_cols, DOT=dot_type(a.dtype),
        PRECISION=dot_precision(a.dtype))


def default_block_m(num_pairs: int, num_experts: int) -> int:
    """Small row tiles when experts see few tokens each (decode), larger ones for prefill."""
    per_expert = num_pairs / max(num_experts, 1)
    return 16 if per_expert <= 16 else 32 if per_expert <= 64 else 64


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
              block_m: int | None = None, block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """Same contract as ``dsv32.kernels.reference.fused_moe``: routed-expert output ``[T, H]`` fp32."""
    check_device(x, w13, w2)
    return _fused(x, _ExpertStack.of(w13, w13_scale), _ExpertStack.of(w2, w2_scale), topk_weights, topk_ids,
                  block_m, block_n, block_k)


def fused_moe_int(x: torch.Tensor, w13: PackedIntWeight, w2: PackedIntWeight, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, block_m: int | None = None, block_n: int = 64,
                  block_k: int = 64) -> torch.Tensor:
    """Same contract as ``dsv32.kernels.reference.fused_moe_int`` for expert stacks packed in the ``triton`` layout
    (W8A16 / W4A16, or W8A8 with ``act_quant``); ids outside ``[0, E)`` (another rank's experts) contribute nothing,
    so it also serves as the fixed-shape form a captured graph holds (no host sync)."""
    check_device(x, w13.data, w2.data)
    num_experts = w13.data.shape[0]
    routed = (topk_ids >= 0) & (topk_ids < num_experts)
    return _fused(x, _ExpertStack.of_int(w13), _ExpertStack.of_int(w2), topk_weights * routed,
                  topk_ids.clamp(0, num_experts - 1), block_m, block_n, block_k)


def _fused(x: torch.Tensor, w13: _ExpertStack, w2: _ExpertStack, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
           block_m: int | None, block_n: int, block_k: int) -> torch.Tensor:
    num_tokens, hidden = x.shape
    num_experts, inter = w13.data.shape[0], w13.data.shape[1] // 2
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    if num_pairs == 0:
        return torch.zeros(num_tokens, hidden, dtype=torch.float32, device=x.device)
    block_m = block_m or default_block_m(num_pairs, num_experts)
    sorted_pairs, block_expert = align_pairs(topk_ids, num_experts, block_m)
    pair_weights = topk_weights.flatten().float().contiguous()
    x = x.contiguous()
    h = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    _launch(x, w13, h, sorted_pairs, block_expert, pair_weights, num_pairs, top_k, gated=True,
            weighted=False, block_m=block_m, block_n=block_n, block_k=block_k)
    y = torch.empty(num_pairs, hidden, dtype=torch.float32, device=x.device)
    _launch(h, w2, y, sorted_pairs, block_expert, pair_weights, num_pairs, 1, gated=False, weighted=True,
            block_m=block_m, block_n=block_n, block_k=block_k)
    return y.view(num_tokens, top_k, hidden).sum(1)
