"""Triton weight-only integer GEMMs (W8A16, W4A16): ``y = x @ W^T`` with ``W`` as ``dsv32.kernels.quant`` codes.

* W8A16: ``W[n, k] = q[n, k] * scale[n]``, ``q`` int8 ``[N, K]``: the int8 tile is widened in registers, multiplied
  in the dot type, and the per-row scale applied once to the fp32 accumulator.
* W4A16: ``W[n, k] = (q[n, k] - zero[n, g]) * scale[n, g]``, ``g = k // group``, with the codes two a byte in the
  plain GPU layout ``pack_int4_rows`` makes (byte ``k // 2`` of row ``n``: code ``k`` in the low nibble for even
  ``k``); each ``BLOCK_K`` step (a divisor of the group) lies in one group, so it dequantises its tile with one scale
  and zero per output row.

Activations stay in the compute dtype; the weight never exists in it outside registers. Same contract as
``dsv32.kernels.quant.reference_linear`` (tested under ``TRITON_INTERPRET=1`` in ``tests/kernels``). Not wired into
the model yet (its INT layers run on CPU).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dsv32.kernels.quant import INT4_SYMMETRIC_ZERO, IntWeight
from dsv32.kernels.triton_common import check_device, dot_precision, dot_type


def pack_int4_rows(weight: IntWeight) -> torch.Tensor:
    """INT4 codes ``[N, K]`` (0..15) two a byte along K: uint8 ``[N, K / 2]``, even ``k`` in the low nibble."""
    q = weight.q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


@triton.jit
def _int_linear_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, m_rows, n_out, k_in, stride_x_row, stride_w_n,
                       stride_s_n, stride_out_row, GROUP: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr,
                       PRECISION: tl.constexpr):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = m < m_rows, n < n_out
    kk = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + m.to(tl.int64)[:, None] * stride_x_row
    w_cols = w_ptr + n.to(tl.int64)[None, :] * stride_w_n
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_in, BLOCK_K):
        k = k0 + kk
        k_ok = k < k_in
        x = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(DOT)
        if BITS == 8:
            w = tl.load(w_cols + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0).to(tl.float32)
            acc += tl.dot(x, w.to(DOT), input_precision=PRECISION)
        else:
            byte = tl.load(w_cols + (k // 2)[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0).to(tl.int32)
            code = ((byte >> ((k % 2) * 4)[:, None]) & 15).to(tl.float32)
            group = k0 // GROUP
            scale = tl.load(s_ptr + n * stride_s_n + group, mask=n_ok, other=0.0)
            if HAS_ZERO:
                zero = tl.load(z_ptr + n * stride_s_n + group, mask=n_ok, other=0.0)
            else:
                zero = tl.full([BLOCK_N], 8.0, tl.float32)
            w = (code - zero[None, :]) * scale[None, :]
            acc += tl.dot(x, w.to(DOT), input_precision=PRECISION)
    if BITS == 8:
        acc = acc * tl.load(s_ptr + n * stride_s_n, mask=n_ok, other=0.0)[None, :]
    out_ptrs = out_ptr + m.to(tl.int64)[:, None] * stride_out_row + n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def int_linear(x: torch.Tensor, weight: IntWeight, packed_int4: torch.Tensor | None = None, block_m: int = 32,
               block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """``x @ W^T`` ``[..., N]`` in ``x``'s dtype for a weight-only ``weight`` (8-bit, or 4-bit with
    ``packed_int4 = pack_int4_rows(weight)``; act order and W8A8 activations are not supported here)."""
    if weight.g_idx is not None or weight.act_quant:
        raise ValueError("the Triton INT kernels take weight-only codes in column order (no g_idx, no act_quant)")
    n_out, k_in = weight.shape
    check_device(x, weight.scale)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k_in).contiguous()
    scale = weight.scale.float().reshape(n_out, -1).contiguous()
    if weight.bits == 8:
        w, zero, group = weight.q.contiguous(), scale, k_in
    else:
        if packed_int4 is None:
            raise ValueError("4-bit weights need packed_int4 = pack_int4_rows(weight)")
        w, group = packed_int4, weight.group_size
        zero = (weight.zero.float().contiguous() if weight.zero is not None
                else torch.full_like(scale, INT4_SYMMETRIC_ZERO))
        block_k = math.gcd(block_k, group)
        if block_k < 16:
            raise ValueError(f"INT4 group {group} must be a multiple of 16 for the Triton W4A16 GEMM")
    out = torch.empty(x2.shape[0], n_out, dtype=x.dtype, device=x.device)
    if x2.shape[0] == 0:
        return out.view(*lead, n_out)
    grid = (triton.cdiv(x2.shape[0], block_m), triton.cdiv(n_out, block_n))
    _int_linear_kernel[grid](x2, w, scale, zero, out, x2.shape[0], n_out, k_in, x2.stride(0), w.stride(0),
                             scale.stride(0), out.stride(0), GROUP=group, BITS=weight.bits,
                             HAS_ZERO=weight.bits == 4 and weight.zero is not None, BLOCK_M=block_m,
                             BLOCK_N=block_n, BLOCK_K=block_k, DOT=dot_type(x.dtype),
                             PRECISION=dot_precision(x.dtype))
    return out.view(*lead, n_out)
