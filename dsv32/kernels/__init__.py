"""Kernel backend selection: one interface for the hot ops, Triton kernels on CUDA, plain PyTorch everywhere else.

The model calls ``get_backend(tensor.device).<op>(...)``; both backends implement the same signatures (documented
in ``dsv32.kernels.reference``; the torch backend is its functions but for the long-context ops, tiled in
``dsv32.kernels.tiled``):

* ``indexer_topk``: lightning-indexer scores over the paged (auto / FP8) key cache + top-k positions;
* ``mla_decode`` / ``mla_prefill``: (sparse) MLA over the paged latent cache, with the ``MLAWeights`` prepared at
  load (decode: absorbed form; prefill: Triton absorbed 576/512, torch expanded); ``dsv32.kernels.attention`` builds
  their metadata once per step and dispatches a step's decodes and prefill chunks to them;
* ``fused_moe``: routed experts as grouped GEMMs, bf16 or FP8 128x128 block-scaled weights;
* ``rms_norm``: fused residual add + RMSNorm;
* ``fp8_linear``: ``x @ W^T`` for an e4m3 weight with block multipliers (Triton: block-scaled FP8 GEMM).

INT8 / INT4 weights are packed once at load in the layout of the kernels that will multiply them
(``dsv32.kernels.quant``), so their ops follow the weight, not the backend of the call: ``int_weight_layout`` picks
the layout from the device (the one place that choice is made) and ``int_ops(layout)`` gives its ``int_linear`` /
``fused_moe_int`` / ``fused_moe_int_fixed_shape`` (CPU: PyTorch's packed kernels; ``triton``: the W8A16 / W4A16
GEMM and grouped MoE).

A choice is ``auto`` (Triton on CUDA when ``triton`` imports, torch otherwise), ``torch``, or ``triton`` (an error
if it cannot run: no ``triton``, or a CPU device without ``TRITON_INTERPRET=1``). The engine chooses per model
(``EngineConfig.kernel_backend``) and runs the model's calls ``using_backend`` it, which holds for the calling thread
only; ops called outside any such block (a layer on its own) use the process default, chosen once per device type
from ``DSV32_KERNEL_BACKEND`` (``auto`` when unset).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
from collections.abc import Iterator
from contextvars import ContextVar
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

import torch

from dsv32.kernels import reference, torch_ops
from dsv32.kernels.cache_format import CacheLayout
from dsv32.kernels.quant import CPU_LAYOUT, TRITON_LAYOUT, PackedIntWeight

if TYPE_CHECKING:
    from dsv32.kernels.attention import MLAWeights

logger = logging.getLogger(__name__)

BACKEND_ENV = "DSV32_KERNEL_BACKEND"
BACKEND_CHOICES = ("auto", "torch", "triton")


class KernelBackend(Protocol):
    """The hot ops of one backend; ``dsv32.kernels.reference`` documents each contract."""

    name: str

    def indexer_topk(self, q: torch.Tensor, weights: torch.Tensor, index_cache: torch.Tensor, layout: CacheLayout,
                     slot_table: torch.Tensor, kv_lens: torch.Tensor, topk: int) -> torch.Tensor: ...

    def mla_decode(self, q_nope: torch.Tensor, q_pe: torch.Tensor, weights: MLAWeights, latent_cache: torch.Tensor,
                   layout: CacheLayout, slot_table: torch.Tensor, kv_lens: torch.Tensor,
                   topk_positions: torch.Tensor | None, softmax_scale: float) -> torch.Tensor: ...

    def mla_prefill(self, q_nope: torch.Tensor, q_pe: torch.Tensor, weights: MLAWeights, latent_cache: torch.Tensor,
                    layout: CacheLayout, slots: torch.Tensor, positions: torch.Tensor,
                    topk_positions: torch.Tensor | None, softmax_scale: float) -> torch.Tensor: ...

    def fused_moe(self, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, w13_scale: torch.Tensor | None = None,
                  w2_scale: torch.Tensor | None = None) -> torch.Tensor: ...

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...

    def fp8_linear(self, x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor,
                   block: tuple[int, int]) -> torch.Tensor: ...


KERNEL_OPS = ("indexer_topk", "mla_decode", "mla_prefill", "fused_moe", "rms_norm", "fp8_linear")


class IntKernels(Protocol):
    """The ops of integer weights in one layout (``dsv32.kernels.reference`` documents the contracts)."""

    name: str

    def int_linear(self, x: torch.Tensor, weight: PackedIntWeight) -> torch.Tensor: ...

    def fused_moe_int(self, x: torch.Tensor, w13: PackedIntWeight, w2: PackedIntWeight, topk_weights: torch.Tensor,
                      topk_ids: torch.Tensor) -> torch.Tensor: ...

    def fused_moe_int_fixed_shape(self, x: torch.Tensor, w13: PackedIntWeight, w2: PackedIntWeight,
                                  topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor: ...


INT_OPS = ("int_linear", "fused_moe_int", "fused_moe_int_fixed_shape")


class ModuleBackend:
    """A ``KernelBackend`` (or, with ``ops = INT_OPS``, ``IntKernels``) made of one module's functions, each named as
    its op (``torch_ops`` for torch, ``triton_ops`` for Triton)."""

    def __init__(self, name: str, module: ModuleType, ops: tuple[str, ...] = KERNEL_OPS) -> None:
        self.name = name
        for op in ops:
            setattr(self, op, getattr(module, op))


TORCH_BACKEND: KernelBackend = ModuleBackend("torch", torch_ops)


def triton_backend() -> KernelBackend:
    """The Triton kernels (imports ``triton``; fails if it is missing)."""
    from dsv32.kernels import triton_ops

    return ModuleBackend("triton", triton_ops)


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


# The backend of the model running in this thread (a context variable: another model or thread is not affected).
_ACTIVE: ContextVar[KernelBackend | None] = ContextVar("dsv32_kernel_backend", default=None)


@contextlib.contextmanager
def using_backend(backend: KernelBackend) -> Iterator[None]:
    """Run the ops called inside the block (in this thread) on ``backend``."""
    token = _ACTIVE.set(backend)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


# The backend per device type that ops resolve to while ``torch.compile`` traces a captured graph
# (``dsv32.model.graphs``): dynamo cannot read a context variable. Set once per process by the first model that
# captures graphs on that device type (``trace_with``).
_TRACED: dict[str, KernelBackend] = {}


def trace_with(device_type: str, backend: KernelBackend) -> bool:
    """Make ``backend`` the one ops on ``device_type`` resolve to inside compiled graphs; False if another backend
    already holds that place in this process (a graph of this model would then run the other's ops)."""
    return _TRACED.setdefault(device_type, backend) is backend


def get_backend(device: torch.device | str) -> KernelBackend:
    """The backend of the ``using_backend`` block around this call, else the process default for ``device``
    (chosen on first use); while a graph is compiled, the one ``trace_with`` set."""
    if torch.compiler.is_compiling():
        return _TRACED[torch.device(device).type]
    active = _ACTIVE.get()
    return active if active is not None else _backend_for(torch.device(device).type)


def int_weight_layout(device: torch.device | str) -> str | None:
    """The layout INT8 / INT4 weights on ``device`` are packed in (``dsv32.kernels.quant``), hence the kernels that
    multiply them: ``triton`` on CUDA, and on CPU when the backend in effect there is Triton (the interpreter, for
    tests); ``cpu`` (PyTorch's packed kernels) on CPU otherwise; None where no integer kernel runs (CUDA without
    ``triton``, other devices)."""
    device_type = torch.device(device).type
    if device_type == "cpu":
        return TRITON_LAYOUT if get_backend(device_type).name == "triton" else CPU_LAYOUT
    return TRITON_LAYOUT if device_type == "cuda" and triton_runs_on(device_type) else None


def require_int_layout(device: torch.device | str) -> str:
    """``int_weight_layout(device)``; RuntimeError where no integer kernel runs."""
    layout = int_weight_layout(device)
    if layout is None:
        raise RuntimeError(f"INT8 / INT4 weights cannot run on {torch.device(device).type}: their kernels need CPU, or "
                           "CUDA with the triton package")
    return layout


@functools.cache
def int_ops(layout: str) -> IntKernels:
    """The kernels of integer weights packed in ``layout`` (the Triton ones import ``triton``)."""
    if layout == CPU_LAYOUT:
        return ModuleBackend(CPU_LAYOUT, reference, INT_OPS)
    if layout == TRITON_LAYOUT:
        from dsv32.kernels import triton_ops

        return ModuleBackend(TRITON_LAYOUT, triton_ops, INT_OPS)
    raise ValueError(f"integer weight layout {layout!r}: expected {CPU_LAYOUT} or {TRITON_LAYOUT}")
