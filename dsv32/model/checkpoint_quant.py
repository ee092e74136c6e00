"""Integer checkpoint formats: which tensors belong to a quantised weight, and reading them as an ``IntWeight``.

A quantised projection ``X`` is stored as a group of tensors named after it (see ``dsv32.config.QuantConfig``):

* ``w8a8_int8``: ``X.weight`` int8 ``[N, K]``, ``X.weight_scale`` fp32 ``[N, 1]`` (or ``[N]``);
* ``compressed-tensors`` ``pack-quantized``: ``X.weight_packed`` int32 ``[N, K * bits / 32]`` (code ``i`` of a row
  in bits ``bits * (i % (32 / bits))`` of word ``i // (32 / bits)``, each code stored as ``q + 2^(bits - 1)``),
  ``X.weight_scale`` ``[N, K / group]``, ``X.weight_shape`` ``[2]``, optionally ``X.weight_zero_point`` (int32,
  packed the same way along the *rows*: ``[N * bits / 32, K / group]``) and ``X.weight_g_idx`` ``[K]``.

(``fp8`` / ``blockwise_int8`` block-scaled weights, ``X.weight`` + ``X.weight_scale_inv``, are read by the loader
itself and dequantised at load.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dsv32.kernels.quant import IntWeight

# The tensors of a quantised weight besides its codes (they are read with it, never loaded on their own).
COMPANION_SUFFIXES = (".weight_scale", ".weight_zero_point", ".weight_shape", ".weight_g_idx")
PACKED_SUFFIX = ".weight_packed"


def is_companion(name: str) -> bool:
    return name.endswith(COMPANION_SUFFIXES)


def weight_name(name: str) -> str:
    """The checkpoint name of the weight ``name`` stands for (``X.weight_packed`` -> ``X.weight``)."""
    return name[:-len(PACKED_SUFFIX)] + ".weight" if name.endswith(PACKED_SUFFIX) else name


def unpack_int32(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first ``count`` unsigned ``bits``-bit codes of each row of int32 words ``packed`` -> uint8 ``[rows, count]``
    (``bits`` divides 32: codes never straddle words)."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int32, device=packed.device) * bits
    codes = (packed.to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.flatten(-2)[..., :count].to(torch.uint8)


class CheckpointFormatError(ValueError):
    """A quantised tensor group that does not match its format (a missing or misshapen companion)."""


def read_int_weight(method: str, bits: int, name: str, tensor: torch.Tensor,
                    read: Callable[[str], torch.Tensor | None]) -> IntWeight | None:
    """The ``IntWeight`` of checkpoint tensor ``name`` (``tensor``: its data) under ``method``, reading its companions
    with ``read(name) -> tensor or None``; None when ``name`` is a plain weight (an ignored module)."""
    base = weight_name(name)[:-len(".weight")]
    if method == "w8a8_int8" and tensor.dtype == torch.int8:
        scale = _need(read, f"{base}.weight_scale", name).float()
        if scale.numel() != tensor.shape[0]:
            raise CheckpointFormatError(f"{base}.weight_scale has shape {tuple(scale.shape)}, expected "
                                        f"[{tensor.shape[0]}, 1] for the {tuple(tensor.shape)} weight")
        return IntWeight(8, tensor, scale.reshape(-1), act_quant=True)
    if method == "compressed-tensors" and name.endswith(PACKED_SUFFIX):
        return _read_pack_quantized(base, bits, tensor, read)
    return None


def _need(read: Callable[[str], torch.Tensor | None], companion: str, name: str) -> torch.Tensor:
    found = read(companion)
    if found is None:
        raise CheckpointFormatError(f"quantised tensor {name!r} has no {companion!r}")
    return found


def _read_pack_quantized(base: str, bits: int, packed: torch.Tensor,
                         read: Callable[[str], torch.Tensor | None]) -> IntWeight:
    name = base + PACKED_SUFFIX
    rows, cols = (int(v) for v in _need(read, f"{base}.weight_shape", name).tolist())
    scale = _need(read, f"{base}.weight_scale", name).float()
    if packed.shape != (rows, -(-cols * bits // 32)) or scale.dim() != 2 or scale.shape[0] != rows:
        raise CheckpointFormatError(f"{name}: weight_packed {tuple(packed.shape)} / weight_scale "
                                    f"{tuple(scale.shape)} do not fit weight_shape [{rows}, {cols}] at {bits} bits")
    num_groups = scale.shape[1]
    if cols % num_groups:
        raise CheckpointFormatError(f"{base}.weight_scale: {num_groups} groups do not divide {cols} columns")
    offset = 1 << (bits - 1)
    codes = unpack_int32(packed, bits, cols)
    zero_packed = read(f"{base}.weight_zero_point")
    zero = None
    if zero_packed is not None:
        zero = unpack_int32(zero_packed.t().contiguous(), bits, rows).t().float()
        if zero.shape != scale.shape:
            raise CheckpointFormatError(f"{base}.weight_zero_point unpacks to {tuple(zero.shape)}, expected "
                                        f"{tuple(scale.shape)}")
    g_idx = read(f"{base}.weight_g_idx")
    if bits == 8:
        if num_groups != 1 or zero is not None or g_idx is not None:
            raise CheckpointFormatError(f"{name}: 8-bit codes are supported per output channel, symmetric")
        return IntWeight(8, (codes.to(torch.int16) - offset).to(torch.int8), scale[:, 0])
    # symmetric (no zero points): the stored codes sit around the offset, which is the INT4 zero (8)
    return IntWeight(4, codes, scale, zero, cols // num_groups, g_idx.long() if g_idx is not None else None)
