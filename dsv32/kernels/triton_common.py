"""What every Triton kernel here shares: the operand type of ``tl.dot`` and the interpreter switch.

Under ``TRITON_INTERPRET=1`` (CPU tests) Triton emulates bf16 with numpy ``uint16`` and gets bf16 arithmetic and bf16
``tl.dot`` wrong, so every kernel converts its ``tl.dot`` operands to ``DOT`` and does elementwise math in fp32:
``DOT`` is fp32 in the interpreter (exact products of bf16/fp8 inputs) and the tensor-core type on a GPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_TENSOR_CORE_TYPES = {
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.float32: tl.float32,
    torch.float8_e4m3fn: tl.float8e4nv,
}


def dot_type(dtype: torch.dtype) -> tl.dtype:
    """The ``tl.dot`` operand type for data stored as ``dtype``."""
    return tl.float32 if INTERPRET else _TENSOR_CORE_TYPES[dtype]


def dot_precision(dtype: torch.dtype) -> str:
    """``ieee`` when fp32 operands reach ``tl.dot`` (fp32 models must not silently drop to TF32)."""
    return "ieee" if dot_type(dtype) == tl.float32 else "tf32"


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(n)


def check_device(*tensors: torch.Tensor) -> None:
    """Triton runs CUDA tensors, or CPU tensors under the interpreter; fail loudly otherwise."""
    for t in tensors:
        if t.device.type != "cuda" and not INTERPRET:
            raise RuntimeError(f"Triton kernels need CUDA tensors (got {t.device}); set TRITON_INTERPRET=1 to run "
                               "them on CPU")
