"""Kernel tests run the Triton kernels on a GPU when there is one, else on CPU under ``TRITON_INTERPRET=1``.

The interpreter switch must be set before Triton compiles anything, hence here, before the kernel modules load.
Without the ``triton`` package the Triton tests skip; the torch references are still tested.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install -e '.[test]')")


def _round_bf16_to_nearest_even() -> None:
    """The interpreter truncates fp32 -> bf16 (GPUs round to nearest even): convert with torch instead, so stored
    bf16 results round as they do on the device."""
    import triton.language as tl
    from triton.runtime import interpreter

    truncating_cast = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):  # the interpreter builder's own (untyped) signature
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return truncating_cast(self, src, dst_type)

    interpreter.InterpreterBuilder.cast_impl = cast_impl


if HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1":
    _round_bf16_to_nearest_even()


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")
