"""Triton fused residual-add + RMSNorm: one read of ``x`` and ``residual``, one write of ``h`` and of ``RMSNorm(h)``.

Bit-for-bit the rounding of ``dsv32.model.norm.RMSNorm`` after a separate add: ``h = x + residual`` is rounded to the
activation dtype first, the mean square is taken in fp32 over the rounded ``h``, the normalised value is rounded to
the activation dtype before the fp32 weight multiplies it, and the product is rounded again. Each program owns whole
rows (hidden 7168 fits one ``BLOCK``), so a decode layer's two norms cost two launches and no extra round-trips.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv32.kernels.triton_common import check_device, next_power_of_2


@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, y_ptr, h_ptr, n_cols, eps, stride_x, stride_res, stride_y, stride_h,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    h = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h += tl.load(res_ptr + row * stride_res + cols, mask=ok, other=0.0).to(tl.float32)
        h = h.to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * stride_h + cols, h, mask=ok)
        h = h.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / n_cols + eps)
    normed = (h * inv_rms).to(y_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (normed * w).to(y_ptr.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``dsv32.kernels.reference.rms_norm``: ``(RMSNorm(h), h)`` with ``h = x (+ residual)``."""
    check_device(x, weight)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    y = torch.empty_like(x2)
    if residual is None:
        h = x2
        res = x2
    else:
        res = residual.reshape(-1, shape[-1])
        h = torch.empty_like(x2)
    if x2.shape[0]:
        _add_rms_norm_kernel[(x2.shape[0],)](
            x2, res, weight, y, h, shape[-1], eps, x2.stride(0), res.stride(0), y.stride(0), h.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK=next_power_of_2(shape[-1]))
    return y.view(shape), h.view(shape)
