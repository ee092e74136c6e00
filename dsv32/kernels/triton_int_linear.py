"""Triton weight-only integer GEMMs (W8A16, W4A16): ``y = x @ W^T`` with ``W`` as ``dsv32.kernels.quant`` codes.

* W8A16: ``W[n, k] = q[n, k] * scale[n]``, ``q`` int8 ``[N, K]``: the int8 tile is widened in registers, multiplied
  in the dot type, and the per-row scale applied once to the fp32 accumulator.
* W4A16: ``W[n, k] = (q[n, k] - zero[n, g]) * scale[n, g]``, ``g = k // group``, with the codes two a byte in the
  plain GPU layout ``dsv32.kernels.quant.pack_int4_rows`` makes (byte ``k // 2`` of row ``n``: code ``k`` in the
  low nibble for even ``k``); each ``BLOCK_K`` step (a divisor of the group) lies in one group, so it dequantises
  its tile with one scale and zero per output row.

Activations stay in the compute dtype; the weight never exists in it outside registers. Act order (GPTQ ``g_idx``)
gathers the activations' columns in the packed order first; W8A8 (``act_quant``) rounds each activation row to int8
(its values exact in the compute dtype), runs the same GEMM into fp32 and applies the row scales after, which is the
integer product (the int8 tensor-core dot itself is not used). Weights come packed in the ``triton`` layout of
``dsv32.kernels.quant.pack``; same contract as ``dsv32.kernels.quant.reference_linear``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dsv32.kernels.quant import TRITON_LAYOUT, PackedIntWeight, quantize_activations_int8
from dsv32.kernels.triton_common import check_device, dot_precision, dot_type


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


def int_linear(x: torch.Tensor, weight: PackedIntWeight, block_m: int = 32, block_n: int = 64,
               block_k: int = 64) -> torch.Tensor:
    """``x @ W^T`` ``[..., N]`` in ``x``'s dtype for ``weight`` packed in the ``triton`` layout."""
    if weight.layout != TRITON_LAYOUT:
        raise ValueError(f"the Triton INT GEMM takes weights packed in the {TRITON_LAYOUT!r} layout, not "
                         f"{weight.layout!r}")
    n_out, k_in = weight.out_features, weight.in_features
    check_device(x, weight.data)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k_in)
    if weight.perm is not None:
        x2 = x2[:, weight.perm]
    row_scale = None
    if weight.act_quant:
        codes, row_scale = quantize_activations_int8(x2)
        x2 = codes.to(x.dtype)
    x2 = x2.contiguous()
    scale = weight.scales.reshape(n_out, -1)
    zero, group, has_zero = scale, k_in, False
    if weight.bits == 4:
        group = weight.group_size
        has_zero = weight.zeros is not None
        zero = weight.zeros if has_zero else scale
        block_k = math.gcd(block_k, group)
    out = torch.empty(x2.shape[0], n_out, dtype=torch.float32 if weight.act_quant else x.dtype, device=x.device)
    if x2.shape[0]:
        grid = (triton.cdiv(x2.shape[0], block_m), triton.cdiv(n_out, block_n))
        _int_linear_kernel[grid](x2, weight.data, scale, zero, out, x2.shape[0], n_out, k_in, x2.stride(0),
                                 weight.data.stride(0), scale.stride(0), out.stride(0), GROUP=group, BITS=weight.bits,
                                 HAS_ZERO=has_zero, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                                 DOT=dot_type(x.dtype), PRECISION=dot_precision(x.dtype))
    if row_scale is not None:
        out = (out * row_scale).to(x.dtype)
    return out.view(*lead, n_out)
