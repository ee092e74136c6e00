"""YaRN rotary position embedding, in the two layouts DeepSeek-V3.2 uses.

Frequencies (YaRN, always applied when ``rope_scaling`` is set, as HF and vLLM do)::

    f_i   = theta^(-2i/d),  i < d/2
    corr(r) = d * ln(L0 / (2*pi*r)) / (2 * ln theta)
    low = max(floor(corr(beta_fast)), 0);  high = min(ceil(corr(beta_slow)), d - 1)
    ramp_i = clamp((i - low) / (high - low), 0, 1)
    f_i'  = f_i / factor * ramp_i + f_i * (1 - ramp_i)       # high-frequency dims kept, low ones interpolated

angle(p, i) = p * f_i'. cos/sin carry no magnitude scaling (the YaRN mscale lives in the softmax scale).

* MLA uses the **interleaved** (GPT-J) layout: pairs ``(x[2i], x[2i+1])`` rotate by angle i.
* The indexer uses the **half-split** (NeoX) layout: pairs ``(x[i], x[i + d/2])``.
"""

from __future__ import annotations

import math

import torch

from dsv32.config import ModelConfig


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """The (YaRN-scaled) inverse frequencies, ``[qk_rope_head_dim / 2]`` fp32."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation = 1.0 / pos_freqs
    yarn = config.rope_scaling
    if yarn is None:
        return extrapolation
    interpolation = 1.0 / (yarn.factor * pos_freqs)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(yarn.beta_fast)), 0)
    high = min(math.ceil(correction_dim(yarn.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1 where frequencies are extrapolated (kept), 0 where interpolated
    return interpolation * (1 - keep) + extrapolation * keep


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of shape ``[T, d/2]`` for the given absolute positions."""
    angles = positions.to(torch.float32)[:, None] * inv_freq.to(positions.device)[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs ``(x[2i], x[2i+1])``; ``x`` is ``[T, ..., d]``, ``cos``/``sin`` ``[T, d/2]``."""
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[1],)
    c, s = cos.view(shape), sin.view(shape)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)


def apply_rope_half_split(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs ``(x[i], x[i + d/2])``; ``x`` is ``[T, ..., d]``, ``cos``/``sin`` ``[T, d/2]``."""
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[1],)
    c, s = cos.view(shape), sin.view(shape)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
