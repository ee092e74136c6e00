"""Kernel tests run the Triton kernels on a GPU when there is one, else on CPU under ``TRITON_INTERPRET=1``.

The interpreter switch must be set before Triton compiles anything, hence here, before the kernel modules load.
Without the ``triton`` package the Triton tests skip; the torch references are still tested.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install -e '.[test]')")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")
