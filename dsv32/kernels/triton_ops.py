"""The Triton backend's ops under their interface names (see ``dsv32.kernels.KernelBackend``): the CUDA kernels of
``dsv32.kernels.triton_*``, gathered in one module so ``ModuleBackend`` can serve them."""

from dsv32.kernels.triton_fp8_linear import fp8_linear
from dsv32.kernels.triton_indexer import indexer_topk
from dsv32.kernels.triton_mla import mla_decode, mla_prefill
from dsv32.kernels.triton_moe import fused_moe
from dsv32.kernels.triton_norm import rms_norm

__all__ = ["fp8_linear", "fused_moe", "indexer_topk", "mla_decode", "mla_prefill", "rms_norm"]
