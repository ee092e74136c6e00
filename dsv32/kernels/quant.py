"""Weight-only integer formats (INT8 per output channel, INT4 group-wise): quantise, dequantise, pack, multiply.

A quantised ``[N, K]`` weight is first held in its plain form, ``IntWeight`` (what checkpoints store and what the
plain-PyTorch references read), then packed once at load for the device's kernels (``PackedIntWeight``) in one of
two layouts (``dsv32.kernels.int_weight_layout`` picks it from the device; ``dsv32.kernels.int_ops`` the kernels
that read it): ``cpu``, for PyTorch's CPU weight-only kernels, described below, or ``triton``, for the Triton
W8A16 / W4A16 GEMMs of ``dsv32.kernels.triton_int_linear`` / ``triton_moe`` (INT8: ``q`` and fp32 ``scale``; INT4:
the codes two a byte along K, ``pack_int4_rows``, with fp32 ``scale`` and ``zero`` ``[N, K / group]``).

* INT8: ``W[n, k] = q[n, k] * scale[n]`` with ``q`` int8 in ``[-127, 127]``. Packed: ``q`` itself and ``scale`` in
  the compute dtype, multiplied by ``aten._weight_int8pack_mm`` (CPU: the int8 weight is widened in registers, the
  activations stay in the compute dtype). ``act_quant`` (SGLang's ``w8a8_int8``): each activation row is first
  rounded to int8 with its own scale ``amax / 127`` (per-token dynamic), the product is then exact integer
  arithmetic scaled by both scales.
* INT4: ``W[n, k] = (q[n, k] - zero[n, g]) * scale[n, g]`` with ``q`` in ``[0, 15]`` and ``g = k // group_size``
  (symmetric: ``zero = 8``). Packed: torch's CPU tinygemm layout (``aten._convert_weight_to_int4pack_for_cpu``,
  two values a byte) with ``[K / group, N, 2]`` (scale, offset) pairs in the compute dtype, where tinygemm computes
  ``(q - 8) * scale + offset``, so ``offset = (8 - zero) * scale``; multiplied by ``aten._weight_int4pack_mm_for_cpu``.
  GPTQ's act-order (``g_idx``: column ``k`` belongs to group ``g_idx[k]``) is served by sorting the columns by
  group once at load and gathering the activations' columns in the same order at each call (as vLLM does), in
  both layouts.

Neither kernel forms the weight in the compute dtype outside registers: the per-step cost is the packed bytes. They
are matrix-vector kernels, though, slower than the compute dtype's GEMM (AMX / AVX512-BF16 tiles) once there are
many rows: a call with at least ``MANY_ROWS`` rows (a prefill) widens the packed weight to the compute dtype
(``widen``, one matrix at a time, freed after the call) and runs the GEMM, as vLLM's AWQ path does above 256 tokens.
Widening costs ``N * K`` element operations against the GEMM's ``M * N * K`` multiply-adds; decode never does it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache

import torch

INT4_GROUP_SIZE = 128  # online INT4's group along the input features (the public GPTQ/AWQ checkpoints' choice)
INT4_SYMMETRIC_ZERO = 8
INT8_MAX = 127
INT4_MAX = 15
_INT4PACK_N_MULTIPLE = 16  # tinygemm's CPU layout packs 16 output rows together
_INT4PACK_GROUP_SIZES = (32, 64, 128, 256)  # the group sizes tinygemm's CPU kernel takes
_TRITON_GROUP_MULTIPLE = 16  # a Triton W4A16 K step (a divisor of the group) must be a whole tl.dot tile
CPU_LAYOUT = "cpu"
TRITON_LAYOUT = "triton"
LAYOUTS = (CPU_LAYOUT, TRITON_LAYOUT)
# From this many rows on, widening the weight and the compute-dtype GEMM beat the packed kernels (measured on 2
# AVX512/AMX cores: at 64 rows the packed kernels are as fast, at 256 the GEMM path is ~1.5-2x faster).
MANY_ROWS = 128


@dataclass(frozen=True)
class IntWeight:
    """A plain quantised ``[N, K]`` weight (one expert's or one projection's). ``bits`` 8: ``q`` int8 ``[N, K]``,
    ``scale`` fp32 ``[N]``. ``bits`` 4: ``q`` uint8 ``[N, K]`` in ``[0, 15]``, ``scale`` fp32 ``[N, K / group_size]``,
    ``zero`` ``[N, K / group_size]`` (``None``: symmetric, 8), ``g_idx`` int ``[K]`` (``None``: column ``k`` is in
    group ``k // group_size``)."""

    bits: int
    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None
    group_size: int = 0
    g_idx: torch.Tensor | None = None
    act_quant: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def to(self, device: torch.device) -> IntWeight:
        """The same codes on ``device``."""
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return t.to(device) if t is not None else None

        return replace(self, q=self.q.to(device), scale=self.scale.to(device), zero=move(self.zero),
                       g_idx=move(self.g_idx))

    def groups(self) -> torch.Tensor:
        """The group of every input column ``[K]``."""
        if self.g_idx is not None:
            return self.g_idx.long()
        return torch.arange(self.q.shape[1], device=self.q.device) // self.group_size


def quantize_int8(weight: torch.Tensor, act_quant: bool = False) -> IntWeight:
    """Round ``weight`` [N, K] to int8 with one scale per output row, ``amax / 127`` (absmax, symmetric)."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / INT8_MAX
    q = torch.round(w / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return IntWeight(8, q, scale, act_quant=act_quant)


def quantize_int4(weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE, symmetric: bool = True) -> IntWeight:
    """Round ``weight`` [N, K] to 4 bits per ``group_size`` consecutive input columns: symmetric (``amax / 7``, codes
    ``-7..7`` stored as ``1..15`` around zero 8) or asymmetric (``(max - min) / 15`` with an integer zero point)."""
    rows, cols = weight.shape
    if cols % group_size:
        raise ValueError(f"INT4 groups of {group_size} need the input size ({cols}) to be a multiple of it")
    w = weight.float().view(rows, cols // group_size, group_size)
    if symmetric:
        scale = w.abs().amax(dim=-1).clamp(min=1e-12) / (INT4_SYMMETRIC_ZERO - 1)
        zero = None
        q = torch.round(w / scale[..., None]).clamp(1 - INT4_SYMMETRIC_ZERO, INT4_SYMMETRIC_ZERO - 1)
        q = q + INT4_SYMMETRIC_ZERO
    else:
        lo, hi = w.amin(dim=-1).clamp(max=0), w.amax(dim=-1).clamp(min=0)
        scale = ((hi - lo) / INT4_MAX).clamp(min=1e-12)
        zero = torch.round(-lo / scale).clamp(0, INT4_MAX)
        q = (torch.round(w / scale[..., None]) + zero[..., None]).clamp(0, INT4_MAX)
    return IntWeight(4, q.view(rows, cols).to(torch.uint8), scale, zero, group_size)


def concat_rows(first: IntWeight, second: IntWeight) -> IntWeight:
    """One ``IntWeight`` of ``first``'s rows then ``second``'s (an expert's gate and up projections); ValueError when
    their formats differ (bits, groups, zero points, act order)."""
    same_g_idx = (first.g_idx is None and second.g_idx is None) or (
        first.g_idx is not None and second.g_idx is not None and torch.equal(first.g_idx, second.g_idx))
    if ((first.bits, first.group_size, first.act_quant) != (second.bits, second.group_size, second.act_quant)
            or (first.zero is None) != (second.zero is None) or not same_g_idx):
        raise ValueError("the two weights are quantised differently")
    zero = torch.cat((first.zero, second.zero)) if first.zero is not None else None
    return replace(first, q=torch.cat((first.q, second.q)), scale=torch.cat((first.scale, second.scale)), zero=zero)


def narrow_int_weight(weight: IntWeight, dim: int, start: int, count: int) -> IntWeight:
    """Rows (``dim`` 0) or input columns (``dim`` 1) ``start .. start + count - 1`` of ``weight``: a tensor/expert
    parallel rank's part of a checkpoint's codes. Rows take their scales (and zero points) along; columns keep INT8's
    per-row scales, and INT4 groups cut whole keep theirs, while a cut through a group (or an act-order weight)
    keeps the full scale table with each column's group in ``g_idx``, so every code keeps its own scale."""
    if dim == 0:
        zero = weight.zero[start:start + count] if weight.zero is not None else None
        return replace(weight, q=weight.q[start:start + count], scale=weight.scale[start:start + count], zero=zero)
    q = weight.q[:, start:start + count]
    if weight.bits == 8:
        return replace(weight, q=q)
    size = weight.group_size
    if weight.g_idx is None and start % size == 0 and count % size == 0:
        groups = slice(start // size, (start + count) // size)
        zero = weight.zero[:, groups] if weight.zero is not None else None
        return replace(weight, q=q, scale=weight.scale[:, groups], zero=zero)
    return replace(weight, q=q, g_idx=weight.groups()[start:start + count])


def dequantize(weight: IntWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference: ``W`` [N, K] in ``dtype``, formed elementwise from the plain form."""
    if weight.bits == 8:
        return (weight.q.float() * weight.scale.float()[:, None]).to(dtype)
    groups = weight.groups()
    zero = weight.zero.float() if weight.zero is not None else INT4_SYMMETRIC_ZERO
    zero_cols = zero[:, groups] if isinstance(zero, torch.Tensor) else zero
    return ((weight.q.float() - zero_cols) * weight.scale.float()[:, groups]).to(dtype)


def quantize_activations_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (per-token) dynamic INT8: ``(q int8 [..., K], scale fp32 [..., 1])`` with ``x ~ q * scale``."""
    scale = x.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / INT8_MAX
    return torch.round(x.float() / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def reference_linear(x: torch.Tensor, weight: IntWeight) -> torch.Tensor:
    """``x @ W^T`` by dequantise-then-matmul in fp32 (with ``act_quant``, on the int8-rounded activations), in
    ``x``'s dtype: the ground truth of ``int_linear``."""
    xf = x.float()
    if weight.act_quant:
        xq, xs = quantize_activations_int8(x)
        xf = xq.float() * xs
    return (xf @ dequantize(weight).t()).to(x.dtype)


@dataclass(frozen=True)
class PackedIntWeight:
    """An ``IntWeight`` in the layout of one device's kernels (or a stack of ``E`` of them, one per expert, along a
    leading dimension), ``perm`` the act-order column order (``None``: as stored). ``cpu``: ``data`` int8
    ``[.., N, K]`` or tinygemm uint8 ``[.., N, K / 2]``, ``scales`` ``[.., N]`` or ``[.., K / group, N, 2]`` in the
    compute dtype. ``triton``: ``data`` int8 ``[.., N, K]`` or ``pack_int4_rows`` uint8 ``[.., N, K / 2]``,
    ``scales`` fp32 ``[.., N]`` or ``[.., N, K / group]``, ``zeros`` (INT4 with zero points) like the scales."""

    bits: int
    data: torch.Tensor
    scales: torch.Tensor
    out_features: int
    in_features: int
    group_size: int = 0
    perm: torch.Tensor | None = None
    act_quant: bool = False
    layout: str = CPU_LAYOUT
    zeros: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scales, self.perm, self.zeros)
                   if t is not None)

    def expert(self, index: int) -> PackedIntWeight:
        """Expert ``index`` of a stack (contiguous views: nothing is copied)."""
        perm = self.perm[index] if self.perm is not None else None
        zeros = self.zeros[index] if self.zeros is not None else None
        return replace(self, data=self.data[index], scales=self.scales[index], perm=perm, zeros=zeros)


def packable(shape: tuple[int, int], bits: int, group_size: int = INT4_GROUP_SIZE, layout: str = CPU_LAYOUT) -> bool:
    """Whether ``layout``'s kernels take an ``[N, K]`` weight of ``bits``: INT8 any; INT4 needs a group dividing
    ``K``, on CPU one of 32, 64, 128 or 256 and ``N`` a multiple of 16 (tinygemm's row tile), for Triton a multiple
    of 16 (a whole ``tl.dot`` step)."""
    rows, cols = shape
    if bits == 8:
        return True
    if group_size <= 0 or cols % group_size:
        return False
    if layout == TRITON_LAYOUT:
        return group_size % _TRITON_GROUP_MULTIPLE == 0
    return group_size in _INT4PACK_GROUP_SIZES and rows % _INT4PACK_N_MULTIPLE == 0


def pack_int4_rows(q: torch.Tensor) -> torch.Tensor:
    """INT4 codes ``[N, K]`` (0..15) two a byte along K: uint8 ``[N, K / 2]``, even ``k`` in the low nibble."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def _group_sorted_codes(weight: IntWeight) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(codes with the columns sorted by group, that column order)`` for an act-order INT4 weight; the codes as
    stored and ``None`` when its groups are already consecutive columns."""
    if weight.g_idx is None:
        return weight.q, None
    cols = weight.shape[1]
    groups = weight.groups()
    in_order = torch.arange(cols, device=groups.device) // weight.group_size
    if torch.equal(groups, in_order):
        return weight.q, None
    perm = torch.argsort(groups, stable=True)
    if not torch.equal(groups[perm], in_order):
        raise ValueError(f"g_idx does not assign exactly {weight.group_size} columns to each group")
    return weight.q[:, perm], perm


def packable_codes(weight: IntWeight, layout: str = CPU_LAYOUT) -> bool:
    """``packable`` for these codes, and for INT4 with ``g_idx`` whether its groups are ``0 .. K / group - 1`` with
    exactly ``group_size`` columns each (act order: any column order; a rank's cut through groups is not)."""
    if not packable(weight.shape, weight.bits, weight.group_size, layout):
        return False
    if weight.bits == 8 or weight.g_idx is None:
        return True
    cols = weight.shape[1]
    return torch.equal(weight.groups().sort().values, torch.arange(cols, device=weight.q.device) // weight.group_size)


def pack(weight: IntWeight, dtype: torch.dtype, layout: str = CPU_LAYOUT) -> PackedIntWeight:
    """Pack ``weight`` once for ``layout``'s kernels with activations in ``dtype``."""
    if layout not in LAYOUTS:
        raise ValueError(f"integer weight layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    rows, cols = weight.shape
    if not packable(weight.shape, weight.bits, weight.group_size, layout):
        need = (f"a group in {_INT4PACK_GROUP_SIZES}, K % group == 0 and N % {_INT4PACK_N_MULTIPLE} == 0"
                if layout == CPU_LAYOUT else
                f"a group that is a multiple of {_TRITON_GROUP_MULTIPLE} and K % group == 0")
        raise ValueError(f"a {rows}x{cols} INT4 weight with groups of {weight.group_size} does not fit the {layout} "
                         f"INT4 kernel (it needs {need})")
    if weight.bits == 8:
        scale_dtype = torch.float32 if layout == TRITON_LAYOUT else dtype
        return PackedIntWeight(8, weight.q.contiguous(), weight.scale.to(scale_dtype).contiguous(), rows, cols,
                               act_quant=weight.act_quant, layout=layout)
    q, perm = _group_sorted_codes(weight)
    scale = weight.scale.float()
    if layout == TRITON_LAYOUT:
        zeros = weight.zero.float().contiguous() if weight.zero is not None else None
        return PackedIntWeight(4, pack_int4_rows(q), scale.contiguous(), rows, cols, weight.group_size, perm,
                               layout=layout, zeros=zeros)
    zero = weight.zero.float() if weight.zero is not None else torch.full_like(scale, INT4_SYMMETRIC_ZERO)
    offset = (INT4_SYMMETRIC_ZERO - zero) * scale
    data = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
    scales = torch.stack((scale.t(), offset.t()), dim=-1).to(dtype).contiguous()
    return PackedIntWeight(4, data, scales, rows, cols, weight.group_size, perm)


def stack_packed(experts: list[PackedIntWeight]) -> PackedIntWeight:
    """One ``PackedIntWeight`` over ``E`` experts of the same format (stacked along a new leading dimension)."""
    first = experts[0]

    def stacked(name: str) -> torch.Tensor | None:
        return torch.stack([getattr(e, name) for e in experts]) if getattr(first, name) is not None else None

    return replace(first, data=stacked("data"), scales=stacked("scales"), perm=stacked("perm"), zeros=stacked("zeros"))


@cache
def int4pack_block_rows() -> int:
    """Rows per block of tinygemm's CPU INT4 layout, which depends on the CPU kernel PyTorch dispatches to: byte
    ``[block, k, j]`` holds row ``j`` (low nibble) and row ``j + B / 2`` (high nibble) of a block of ``B`` rows, with
    ``B`` 64 on AVX512 and 32 on AVX2. Read off the packing itself (rows numbered by their 16-row group), not
    assumed."""
    rows = (torch.arange(64, dtype=torch.int32) // 16)[:, None].expand(64, 2).contiguous()
    first = int(torch.ops.aten._convert_weight_to_int4pack_for_cpu(rows, 1).view(-1)[0])
    return 32 * (first >> 4)  # the high nibble holds row B / 2, in group (B / 2) / 16


def widenable(weight: PackedIntWeight) -> bool:
    """Whether ``widen`` reads this weight: the ``cpu`` layout's INT8, or INT4 whose rows fill whole tinygemm blocks;
    not W8A8 (its activations are rounded, the integer product is exact already)."""
    return weight.layout == CPU_LAYOUT and not weight.act_quant and (
        weight.bits == 8 or weight.out_features % int4pack_block_rows() == 0)


def widen(weight: PackedIntWeight, dtype: torch.dtype) -> torch.Tensor:
    """The packed weight ``W`` ``[N, K]`` in ``dtype`` (columns in the packed order, ``perm`` applied), straight from
    the packed codes and scales."""
    rows, cols = weight.out_features, weight.in_features
    if weight.bits == 8:
        return weight.data.to(dtype) * weight.scales.to(dtype)[:, None]
    block = int4pack_block_rows()
    blocks = weight.data.view(rows // block, cols, block // 2)
    codes = torch.cat((blocks & 15, blocks >> 4), dim=2).transpose(1, 2).reshape(rows, cols // weight.group_size,
                                                                                weight.group_size)
    scale, offset = weight.scales.to(dtype).permute(2, 1, 0)[..., None]  # each [N, K / group, 1]
    return ((codes.to(dtype) - INT4_SYMMETRIC_ZERO) * scale + offset).view(rows, cols)


def int_linear(x: torch.Tensor, weight: PackedIntWeight) -> torch.Tensor:
    """``x @ W^T`` ``[..., N]`` in ``x``'s dtype for a packed INT8 / INT4 weight in the ``cpu`` layout (CPU packed
    kernels; from ``MANY_ROWS`` rows on, the compute dtype's GEMM on the widened weight)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, weight.in_features)
    if weight.perm is not None:
        x2 = x2[:, weight.perm]
    if x2.shape[0] >= MANY_ROWS and widenable(weight):
        y = x2 @ widen(weight, x.dtype).t()
    elif weight.bits == 8:
        if weight.act_quant:
            xq, xs = quantize_activations_int8(x2)
            # int8 codes are exact in fp32 and the kernel accumulates in fp32: the integer product, then both scales
            y = torch.ops.aten._weight_int8pack_mm(xq.float(), weight.data, weight.scales.float()) * xs
            y = y.to(x.dtype)
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), weight.data, weight.scales)
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), weight.data, weight.group_size, weight.scales)
    return y.view(*lead, weight.out_features)
