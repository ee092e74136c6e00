"""Triton block-scaled FP8 GEMM: ``y = x @ W^T`` with ``W`` stored as e4m3 plus one fp32 multiplier per block.

``W[n, k] = W_fp8[n, k] * scale_inv[n // B_n, k // B_k]`` (DeepSeek: ``B_n = B_k = 128``; partial edge blocks
allowed). One program computes a ``BLOCK_M x BLOCK_N`` output tile; each ``BLOCK_K`` step loads an e4m3 weight tile,
dequantises it in registers (``BLOCK_K`` divides ``B_k``, so the tile lies inside one scale column and each output
column ``n`` takes the multiplier ``scale_inv[n // B_n, k0 // B_k]``), rounds it to the dot operand type (the compute
dtype on a GPU, like dequantise-on-load does) and accumulates ``dot(x_tile, w_tile)`` in fp32. The weight never
exists in the compute dtype outside registers (W8A16: activations stay in the compute dtype).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dsv32.kernels.triton_common import check_device, dot_precision, dot_type


@triton.jit
def _fp8_linear_kernel(x_ptr, w_ptr, s_ptr, out_ptr, m_rows, n_out, k_in,
                       stride_x_row, stride_w_n, stride_s_n, stride_out_row,
                       SCALE_N: tl.constexpr, SCALE_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):
    """``out[m, n] = sum_k x[m, k] * W_fp8[n, k] * scale_inv[n // SCALE_N, k // SCALE_K]`` (fp32 accumulate)."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = m < m_rows, n < n_out
    kk = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + m.to(tl.int64)[:, None] * stride_x_row
    w_cols = w_ptr + n.to(tl.int64)[None, :] * stride_w_n
    s_rows = s_ptr + (n // SCALE_N) * stride_s_n
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_in, BLOCK_K):
        k_ok = (k0 + kk) < k_in
        x = tl.load(x_rows + (k0 + kk)[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(DOT)
        w = tl.load(w_cols + (k0 + kk)[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        scale = tl.load(s_rows + k0 // SCALE_K, mask=n_ok, other=0.0)
        acc += tl.dot(x, (w * scale[None, :]).to(DOT), input_precision=PRECISION)
    out_ptrs = out_ptr + m.to(tl.int64)[:, None] * stride_out_row + n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
               block_m: int = 32, block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """Same contract as ``dsv32.kernels.reference.fp8_linear``: ``x`` [..., K] (compute dtype), ``weight`` [N, K]
    e4m3, ``scale_inv`` [ceil(N / block[0]), ceil(K / block[1])] fp32 -> ``[..., N]`` in ``x``'s dtype. ``block_k``
    is cut to a divisor of ``block[1]`` (at least 16, ``tl.dot``'s minimum)."""
    check_device(x, weight, scale_inv)
    n_out, k_in = weight.shape
    expected = (-(-n_out // block[0]), -(-k_in // block[1]))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} for a {n_out}x{k_in} "
                         f"weight with {block[0]}x{block[1]} blocks")
    block_k = math.gcd(block_k, block[1])
    if block_k < 16:
        raise ValueError(f"FP8 scale block width {block[1]} must be a multiple of 16 for the Triton FP8 GEMM")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k_in).contiguous()
    w = weight.contiguous()
    s = scale_inv.float().contiguous()
    out = torch.empty(x2.shape[0], n_out, dtype=x.dtype, device=x.device)
    if x2.shape[0] == 0:
        return out.view(*lead, n_out)
    grid = (triton.cdiv(x2.shape[0], block_m), triton.cdiv(n_out, block_n))
    _fp8_linear_kernel[grid](x2, w, s, out, x2.shape[0], n_out, k_in, x2.stride(0), w.stride(0), s.stride(0),
                             out.stride(0), SCALE_N=block[0], SCALE_K=block[1], BLOCK_M=block_m, BLOCK_N=block_n,
                             BLOCK_K=block_k, DOT=dot_type(x.dtype), PRECISION=dot_precision(x.dtype))
    return out.view(*lead, n_out)
