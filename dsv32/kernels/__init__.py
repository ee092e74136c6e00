"""Kernel backend selection: one interface for the hot ops, Triton kernels on CUDA, plain PyTorch everywhere else.

The model calls ``get_backend(tensor.device).<op>(...)``; both backends implement the same signatures (documented
in ``dsv32.kernels.reference``, whose functions *are* the torch backend):

* ``indexer_topk``: lightning-indexer scores over the paged (auto / FP8) key cache + top-k positions;
* ``mla_decode`` / ``mla_prefill``: (sparse) MLA over the paged latent cache (Triton: absorbed 576/512 form);
* ``fused_moe``: routed experts as grouped GEMMs, bf16 or FP8 128x128 block-scaled weights;
* ``rms_norm``: fused residual add + RMSNorm;
* ``fp8_linear``: ``x @ W^T`` for an e4m3 weight with block multipliers (Triton: block-scaled FP8 GEMM).

The choice is made once per device type, from ``DSV32_KERNEL_BACKEND``: ``auto`` (default: Triton on CUDA when
``triton`` imports, torch otherwise), ``torch``, or ``triton`` (an error if it cannot run: no ``triton``, or a CPU
device without ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dsv32.kernels import reference

logger = logging.getLogger(__name__)

BACKEND_ENV = "DSV32_KERNEL_BACKEND"
BACKEND_CHOICES = ("auto", "torch", "triton")


@dataclass(frozen=True)
class KernelBackend:
    """The hot ops of one backend (see the module docstring and ``dsv32.kernels.reference`` for the contracts)."""

    name: str
    indexer_topk: Callable[..., torch.Tensor]
    mla_decode: Callable[..., torch.Tensor]
    mla_prefill: Callable[..., torch.Tensor]
    fused_moe: Callable[..., torch.Tensor]
    rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    fp8_linear: Callable[..., torch.Tensor]


TORCH_BACKEND = KernelBackend("torch", reference.indexer_topk, reference.mla_decode, reference.mla_prefill,
                              reference.fused_moe, reference.rms_norm, reference.fp8_linear)


def triton_backend() -> KernelBackend:
    """The Triton kernels (imports ``triton``; fails if it is missing)."""
    from dsv32.kernels import triton_fp8_linear, triton_indexer, triton_mla, triton_moe, triton_norm

    return KernelBackend("triton", triton_indexer.indexer_topk, triton_mla.mla_decode, triton_mla.mla_prefill,
                         triton_moe.fused_moe, triton_norm.rms_norm, triton_fp8_linear.fp8_linear)


def triton_runs_on(device_type: str) -> bool:
    """Whether Triton can run kernels on this device type here."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device_type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def select_backend(device_type: str, choice: str | None = None) -> KernelBackend:
    """Pick the backend for ``device_type`` (``choice`` defaults to ``$DSV32_KERNEL_BACKEND`` or ``auto``)."""
    choice = (choice or os.environ.get(BACKEND_ENV) or "auto").lower()
    if choice not in BACKEND_CHOICES:
        raise ValueError(f"{BACKEND_ENV}={choice!r}: expected one of {', '.join(BACKEND_CHOICES)}")
    if choice == "torch" or (choice == "auto" and not (device_type == "cuda" and triton_runs_on(device_type))):
        return TORCH_BACKEND
    if not triton_runs_on(device_type):
        raise RuntimeError(f"{BACKEND_ENV}=triton cannot run on {device_type}: it needs the triton package and a CUDA "
                           "device (or TRITON_INTERPRET=1 on CPU)")
    return triton_backend()


@functools.cache
def _backend_for(device_type: str) -> KernelBackend:
    backend = select_backend(device_type)
    logger.info("kernel backend for %s: %s", device_type, backend.name)
    return backend


def get_backend(device: torch.device | str) -> KernelBackend:
    """The backend for ``device``, chosen on first use and kept for the life of the process."""
    return _backend_for(torch.device(device).type)
