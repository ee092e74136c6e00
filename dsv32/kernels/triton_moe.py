"""Triton fused MoE: grouped GEMMs over the routed (token, expert) pairs, bf16 or FP8 block-scaled expert weights.

1. ``align_pairs`` sorts the ``T * k`` pairs by expert and pads every expert's run to a multiple of ``BLOCK_M``, so
   each ``BLOCK_M`` rows of ``sorted_pairs`` belong to one expert (``block_expert``). It is built with device ops
   only (no ``.item()``/``.tolist()``), sized for the worst case, so it can be captured in a CUDA graph; unused blocks
   carry expert ``-1`` and their programs exit at once.
2. ``gate_up``: ``h[pair] = silu(W1_e x_tok) * (W3_e x_tok)``: one program computes the matching gate and up column
   tiles and applies SwiGLU in its epilogue, so the ``[pairs, 2I]`` intermediate is never written.
3. ``down``: ``y[pair] = w_pair * W2_e h[pair]`` in fp32, then ``out[t] = sum_j y[t, j]`` (deterministic, no atomics).

FP8 weights stay e4m3 in memory with one fp32 multiplier per 128x128 block; a ``BLOCK_K`` tile (which divides 128)
lies inside one scale column, so each K step does ``acc += dot(a, w) * scale[n_block]`` (W8A16: activations stay in
the compute dtype).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv32.kernels.triton_common import check_device, dot_precision, dot_type

SCALE_BLOCK = 128


@triton.jit
def _grouped_gemm_kernel(a_ptr, w_ptr, w_scale_ptr, out_ptr, sorted_pairs_ptr, block_expert_ptr, pair_weight_ptr,
                         num_pairs, n_out, k_in, a_rows_per_pair,
                         stride_a_row, stride_w_expert, stride_w_n, stride_w_k,
                         stride_s_expert, stride_s_n, stride_s_k, stride_out_row,
                         GATED: tl.constexpr, WEIGHTED: tl.constexpr, FP8: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALE_BLOCK: tl.constexpr,
                         DOT: tl.constexpr, PRECISION: tl.constexpr):
    """``out[pair, n] = A[pair // a_rows_per_pair] @ W_e[n]`` for ``n < n_out``; GATED: ``W_e`` has ``2 n_out``
    rows (gate then up) and ``out = silu(gate) * up``; WEIGHTED: times ``pair_weight[pair]``."""
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
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_in, BLOCK_K):
        k_ok = (k0 + kk) < k_in
        a = tl.load(a_ptr + a_rows[:, None] * stride_a_row + (k0 + kk)[None, :],
                    mask=pair_ok[:, None] & k_ok[None, :], other=0.0).to(DOT)
        w_mask = k_ok[:, None] & n_ok[None, :]
        w = tl.load(w_base + n[None, :] * stride_w_n + (k0 + kk)[:, None] * stride_w_k, mask=w_mask, other=0.0)
        part = tl.dot(a, w.to(DOT), input_precision=PRECISION)
        if FP8:
            part *= tl.load(s_base + (n // SCALE_BLOCK) * stride_s_n + (k0 // SCALE_BLOCK) * stride_s_k,
                            mask=n_ok, other=0.0)[None, :]
        acc += part
        if GATED:
            up_rows = n + n_out
            w_up = tl.load(w_base + up_rows[None, :] * stride_w_n + (k0 + kk)[:, None] * stride_w_k, mask=w_mask,
                           other=0.0)
            part_up = tl.dot(a, w_up.to(DOT), input_precision=PRECISION)
            if FP8:
                part_up *= tl.load(s_base + (up_rows // SCALE_BLOCK) * stride_s_n + (k0 // SCALE_BLOCK) * stride_s_k,
                                   mask=n_ok, other=0.0)[None, :]
            acc_up += part_up
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


def _launch(a: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor | None, out: torch.Tensor,
            sorted_pairs: torch.Tensor, block_expert: torch.Tensor, pair_weights: torch.Tensor, num_pairs: int,
            a_rows_per_pair: int, gated: bool, weighted: bool, block_m: int, block_n: int, block_k: int) -> None:
    n_out = w.shape[1] // 2 if gated else w.shape[1]
    k_in = w.shape[2]
    fp8 = w_scale is not None
    if fp8 and SCALE_BLOCK % block_k:
        raise ValueError(f"block_k {block_k} must divide the FP8 scale block {SCALE_BLOCK}")
    scale = w_scale if fp8 else w
    grid = (block_expert.numel(), triton.cdiv(n_out, block_n))
    _grouped_gemm_kernel[grid](
        a, w, scale, out, sorted_pairs, block_expert, pair_weights, num_pairs, n_out, k_in, a_rows_per_pair,
        a.stride(0), w.stride(0), w.stride(1), w.stride(2), scale.stride(0), scale.stride(1), scale.stride(2),
        out.stride(0),
        GATED=gated, WEIGHTED=weighted, FP8=fp8, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        SCALE_BLOCK=SCALE_BLOCK, DOT=dot_type(a.dtype), PRECISION=dot_precision(a.dtype))


def default_block_m(num_pairs: int, num_experts: int) -> int:
    """Small row tiles when experts see few tokens each (decode), larger ones for prefill."""
    per_expert = num_pairs / max(num_experts, 1)
    return 16 if per_expert <= 16 else 32 if per_expert <= 64 else 64


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
              block_m: int | None = None, block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """Same contract as ``dsv32.kernels.reference.fused_moe``: routed-expert output ``[T, H]`` fp32."""
    check_device(x, w13, w2)
    num_tokens, hidden = x.shape
    num_experts, inter = w13.shape[0], w13.shape[1] // 2
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    if num_pairs == 0:
        return torch.zeros(num_tokens, hidden, dtype=torch.float32, device=x.device)
    block_m = block_m or default_block_m(num_pairs, num_experts)
    sorted_pairs, block_expert = align_pairs(topk_ids, num_experts, block_m)
    pair_weights = topk_weights.flatten().float().contiguous()
    x = x.contiguous()
    h = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    _launch(x, w13, w13_scale, h, sorted_pairs, block_expert, pair_weights, num_pairs, top_k, gated=True,
            weighted=False, block_m=block_m, block_n=block_n, block_k=block_k)
    y = torch.empty(num_pairs, hidden, dtype=torch.float32, device=x.device)
    _launch(h, w2, w2_scale, y, sorted_pairs, block_expert, pair_weights, num_pairs, 1, gated=False, weighted=True,
            block_m=block_m, block_n=block_n, block_k=block_k)
    return y.view(num_tokens, top_k, hidden).sum(1)
