"""``Linear``: a bias-free projection whose weight is loaded, never initialised (DeepSeek has no linear biases).

Under tensor parallelism a ``Linear`` holds one ``Shard`` of the full weight: column-parallel (``shard_dim = 0``,
a slice of the output features) or row-parallel (``shard_dim = 1``, a slice of the input features; the caller
all-reduces the partial outputs). ``in_features`` / ``out_features`` are the local sizes.

The weight is either in the compute dtype or, loaded with ``keep_fp8``, as the checkpoint stores it: e4m3 with one
fp32 multiplier per block, ``W[n, k] = W_fp8[n, k] * weight_scale_inv[n // b_n, k // b_k]`` (``(b_n, b_k)`` is the
checkpoint's ``weight_block_size``, 128x128 for DeepSeek; partial edge blocks allowed).

Or, quantised to INT8 / INT4 (``quantize``: online at load, or a quantised checkpoint's codes), the weight lives only
as a ``PackedIntWeight`` (``dsv32.kernels.quant``) in its device's layout (``dsv32.kernels.int_weight_layout``: the
CPU's packed integer kernels, or the Triton W8A16 / W4A16 GEMM on CUDA), multiplied by that layout's kernel;
``weight`` is then an empty placeholder.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv32.distributed.parallel import Shard
from dsv32.kernels import get_backend, int_ops, require_int_layout
from dsv32.kernels.fp8 import FP8_DTYPE, dequantize_block_fp8
from dsv32.kernels.quant import IntWeight, PackedIntWeight, pack
from dsv32.kernels.reference import matmul_wt, packed_linear, prepack_weight


class Linear(nn.Module):
    """``y = x @ W^T`` with ``W`` of shape ``[out_features, in_features]`` (HF layout, so checkpoint names match)."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype | None = None,
                 shard: Shard | None = None, shard_dim: int = 0) -> None:
        """``in_features`` / ``out_features``: the full sizes; with ``shard``, this rank holds part ``shard.rank``
        of dimension ``shard_dim`` of the ``[out, in]`` weight."""
        super().__init__()
        self.full_shape = (out_features, in_features)
        self.shard = shard if shard is not None and shard.size > 1 else None
        self.shard_dim = shard_dim
        if self.shard is not None:
            if shard_dim == 0:
                out_features = self.shard.local(out_features)
            else:
                in_features = self.shard.local(in_features)
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.dtype = self.weight.dtype  # the compute dtype, also when the weight is kept in e4m3
        self.block: tuple[int, int] | None = None
        self.register_buffer("weight_scale_inv", None, persistent=False)
        self.packed_weight: torch.Tensor | None = None  # see prepare_weights
        self.int_weight: PackedIntWeight | None = None  # see quantize

    def quantize(self, weight: IntWeight) -> None:
        """Hold the weight as ``weight`` (INT8 / INT4 codes of this ``[out, in]`` matrix), moved to this layer's device
        and packed for its integer kernels; the compute-dtype weight is released."""
        if weight.shape != (self.out_features, self.in_features):
            raise ValueError(f"quantised weight has shape {weight.shape}, expected "
                             f"{(self.out_features, self.in_features)}")
        device = self.weight.device
        self.int_weight = pack(weight.to(device), self.dtype, require_int_layout(device))
        self.weight = nn.Parameter(torch.empty(0, dtype=self.dtype, device=self.weight.device), requires_grad=False)
        self.weight_scale_inv = None
        self.packed_weight = None

    def prepare_weights(self) -> None:
        """Prepack a compute-dtype weight for the CPU's GEMM once after loading (``dsv32.kernels`` ``prepack_weight``;
        ``load_model`` calls it; call it again after changing the weight)."""
        plain = self.weight_scale_inv is None and self.int_weight is None
        self.packed_weight = prepack_weight(self.weight) if plain else None

    def to_fp8(self, block: tuple[int, int]) -> None:
        """Store the weight as e4m3 with ``block`` multipliers (both left to be filled, e.g. by the loader): the
        weight becomes ``[N, K]`` e4m3 and ``weight_scale_inv`` ``[ceil(N / b_n), ceil(K / b_k)]`` fp32."""
        device = self.weight.device
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features, dtype=FP8_DTYPE, device=device),
                                   requires_grad=False)
        self.weight_scale_inv = torch.zeros(-(-self.out_features // block[0]), -(-self.in_features // block[1]),
                                            dtype=torch.float32, device=device)
        self.block = block
        self.packed_weight = None

    def dequantized_weight(self) -> torch.Tensor:
        """``W`` in the compute dtype (the weight itself unless it is kept in e4m3 or integers; then a fresh
        dequantised copy)."""
        if self.int_weight is not None:  # the kernel's own product with the identity (W^T, as it multiplies)
            parts = []
            for start in range(0, self.in_features, 1024):  # 1024 rows of the identity at a time
                rows = torch.zeros(min(1024, self.in_features - start), self.in_features, dtype=self.dtype,
                                   device=self.weight.device)
                rows.diagonal(start).fill_(1)
                parts.append(int_ops(self.int_weight.layout).int_linear(rows, self.int_weight))
            return torch.cat(parts).t().contiguous()
        if self.weight_scale_inv is None:
            return self.weight
        return dequantize_block_fp8(self.weight, self.weight_scale_inv, self.block, self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        if self.int_weight is not None:
            return int_ops(self.int_weight.layout).int_linear(x, self.int_weight)
        if self.weight_scale_inv is not None:
            return get_backend(x.device).fp8_linear(x, self.weight, self.weight_scale_inv, self.block)
        # oneDNN's packed weight is opaque to torch.compile; a compiled graph packs its (frozen) weights itself.
        if self.packed_weight is not None and not torch.compiler.is_compiling():
            return packed_linear(x, self.packed_weight)
        return matmul_wt(x, self.weight)


def narrow_padded(full: torch.Tensor, dim: int, shard: Shard) -> torch.Tensor:
    """Part ``shard`` of ``full`` along ``dim``, zero-padded to ``shard.local`` rows when the last part is short."""
    start, count = shard.bounds(full.shape[dim])
    part = full.narrow(dim, start, count)
    local = shard.local(full.shape[dim])
    if count == local:
        return part
    shape = list(full.shape)
    shape[dim] = local
    padded = torch.zeros(shape, dtype=full.dtype, device=full.device)
    padded.narrow(dim, 0, count).copy_(part)
    return padded
