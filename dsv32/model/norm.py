"""Normalisations: RMSNorm (every DeepSeek norm) and the indexer key's LayerNorm.

RMSNorm:   y = w * (x / sqrt(mean(x^2) + eps)): the normalisation in fp32, rounded to the input dtype before and after
           the weight (as HF and DeepSeek do).
LayerNorm: y = w * (x - mean(x)) / sqrt(var(x) + eps) + b, in fp32 (the indexer's ``k_norm``).
Norm weights are loaded in fp32, as the V3.2 checkpoint stores them. RMSNorm also keeps a copy in the compute dtype
when that copy is exact (a bf16 checkpoint's norms), so the weight product runs in the compute dtype and rounds the
same; otherwise it multiplies by the fp32 weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv32.kernels import get_backend


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.compute_weight: torch.Tensor | None = None

    def prepare_weights(self, dtype: torch.dtype) -> None:
        """Also keep the weight in the compute dtype when it is exactly representable there (a bf16 checkpoint's
        norms): the products round the same, without promoting every row to fp32 and back."""
        weight = self.weight.detach().to(dtype)
        self.compute_weight = weight if torch.equal(weight.float(), self.weight.float()) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_forward(x, None)[0]

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused residual add + RMSNorm (``dsv32.kernels`` ``rms_norm``): ``h = x + residual`` (``h = x``
        without one) -> ``(RMSNorm(h), h)``."""
        weight = self.weight
        if self.compute_weight is not None and self.compute_weight.dtype == x.dtype:
            weight = self.compute_weight
        return get_backend(x.device).rms_norm(x, weight, self.eps, residual)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), (x.shape[-1],), self.weight, self.bias, self.eps).to(x.dtype)
