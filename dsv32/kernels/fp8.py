"""FP8 (e4m3) helpers: 128x128 block weight (de)quantisation, per-128 activation quantisation, Hadamard rotation.

* Weights: ``W[i, j] = W_fp8[i, j] * scale_inv[i // 128, j // 128]`` ("inv" is historical: it multiplies). Edge
  blocks may be partial (e.g. 576 rows = 4.5 blocks).
* Activations (``act_quant``, DeepSeek's kernel): per contiguous block of 128 values,
  ``s = amax / 448`` (or, with ``ue8m0`` scales, ``2^ceil(log2(amax / 448))``), ``q = e4m3(clamp(x / s, ±448))``.
* ``hadamard``: ``y = x @ H_n / sqrt(n)`` with the Sylvester Hadamard matrix; orthonormal, so it only changes how
  FP8 rounding falls (the indexer rotates both q and k before quantising).
"""

from __future__ import annotations

import functools

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0


def dequantize_block_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128),
                         dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Dequantise a 2-D e4m3 weight with one fp32 multiplier per ``block`` (partial edge blocks allowed)."""
    rows, cols = weight.shape
    br, bc = block
    expected = (-(-rows // br), -(-cols // bc))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} for a "
                         f"{rows}x{cols} weight with {br}x{bc} blocks")
    scale = scale_inv.float().repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]
    return (weight.float() * scale).to(dtype)


def quantize_block_fp8(weight: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a 2-D weight to e4m3 with one fp32 scale per block: returns ``(w_fp8, scale_inv)``."""
    rows, cols = weight.shape
    br, bc = block
    nr, nc = -(-rows // br), -(-cols // bc)
    padded = torch.zeros(nr * br, nc * bc, dtype=torch.float32, device=weight.device)
    padded[:rows, :cols] = weight.float()
    blocks = padded.view(nr, br, nc, bc)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale = amax / FP8_MAX
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(nr * br, nc * bc)[:rows, :cols].contiguous(), scale


def _ue8m0(scale: torch.Tensor) -> torch.Tensor:
    """Round a positive scale up to a power of two (DeepSeek's ``ue8m0`` scale format)."""
    return torch.exp2(torch.ceil(torch.log2(scale)))


def act_quant(x: torch.Tensor, block: int = 128, scale_fmt: str | None = "ue8m0") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise the last dim per contiguous ``block`` values: returns ``(q e4m3 [..., n], s fp32 [..., n/block])``."""
    n = x.shape[-1]
    if n % block:
        raise ValueError(f"act_quant needs the last dim ({n}) to be a multiple of the block ({block})")
    xb = x.float().unflatten(-1, (n // block, block))
    amax = xb.abs().amax(-1).clamp(min=1e-4)
    s = amax / FP8_MAX
    if scale_fmt == "ue8m0":
        s = _ue8m0(s)
    q = (xb / s[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.flatten(-2), s


def act_dequant(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``act_quant``."""
    block = q.shape[-1] // s.shape[-1]
    return (q.float().unflatten(-1, (s.shape[-1], block)) * s[..., None]).flatten(-2).to(dtype)


@functools.lru_cache(maxsize=8)
def _hadamard_matrix(n: int, device: str) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return (h * n**-0.5).to(device)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """``x @ H_n / sqrt(n)`` over the last dim (``n`` a power of two), computed in fp32, cast back."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"hadamard needs a power-of-two width, got {n}")
    return (x.float() @ _hadamard_matrix(n, str(x.device))).to(x.dtype)
