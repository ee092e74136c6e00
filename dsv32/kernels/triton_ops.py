"""The Triton backend: the CUDA kernels of ``dsv32.kernels.triton_*`` behind the ``KernelBackend`` interface."""

from __future__ import annotations

from dsv32.kernels import triton_fp8_linear, triton_indexer, triton_mla, triton_moe, triton_norm


class TritonBackend:
    name = "triton"
    indexer_topk = staticmethod(triton_indexer.indexer_topk)
    mla_decode = staticmethod(triton_mla.mla_decode)
    mla_prefill = staticmethod(triton_mla.mla_prefill)
    fused_moe = staticmethod(triton_moe.fused_moe)
    rms_norm = staticmethod(triton_norm.rms_norm)
    fp8_linear = staticmethod(triton_fp8_linear.fp8_linear)
