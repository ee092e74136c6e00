"""The torch (CPU) backend's ops under their interface names (see ``dsv32.kernels.KernelBackend``): the tiled
long-context ops of ``dsv32.kernels.tiled`` (indexer top-k, prefill attention) and ``dsv32.kernels.reference`` for
the rest, gathered in one module so ``ModuleBackend`` can serve them."""

from dsv32.kernels.reference import fp8_linear, fused_moe, mla_decode, rms_norm
from dsv32.kernels.tiled import indexer_topk, mla_prefill

__all__ = ["fp8_linear", "fused_moe", "indexer_topk", "mla_decode", "mla_prefill", "rms_norm"]
