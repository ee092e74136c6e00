"""The Triton backend's ops under their interface names (see ``dsv32.kernels.KernelBackend``): the CUDA kernels of
``dsv32.kernels.triton_*``, gathered in one module so ``ModuleBackend`` can serve them; with the ``triton`` layout's
integer-weight ops (``dsv32.kernels.INT_OPS``)."""

from dsv32.kernels.triton_fp8_linear import fp8_linear
from dsv32.kernels.triton_indexer import indexer_topk
from dsv32.kernels.triton_int_linear import int_linear
from dsv32.kernels.triton_mla import mla_decode, mla_prefill
from dsv32.kernels.triton_moe import fused_moe, fused_moe_int
from dsv32.kernels.triton_norm import rms_norm

# The grouped INT MoE is sync-free and drops ids outside [0, E): it is its own fixed-shape form.
fused_moe_int_fixed_shape = fused_moe_int

__all__ = ["fp8_linear", "fused_moe", "fused_moe_int", "fused_moe_int_fixed_shape", "indexer_topk", "int_linear",
           "mla_decode", "mla_prefill", "rms_norm"]
