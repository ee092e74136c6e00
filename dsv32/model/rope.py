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
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Rotary:
    """One step's rotation for one layout, over vectors of ``width`` values whose first ``2 * d/2`` rotate (the rest
    pass through), as one fused expression built once per step: ``y = x * cos + x[perm] * sin`` where ``perm``
    maps each value to its rotation partner and ``sin`` carries the sign. ``y_i = x_i c - x_p s`` and
    ``y_p = x_p c + x_i s`` round exactly as the textbook two-multiply form."""

    cos: torch.Tensor  # [T, width]
    sin: torch.Tensor  # [T, width], signed; 0 where values pass through
    perm: torch.Tensor  # [width]

    @classmethod
    def build(cls, cos: torch.Tensor, sin: torch.Tensor, width: int, interleaved: bool) -> Rotary:
        """From ``rope_cos_sin``'s ``[T, d/2]`` tables: ``interleaved`` rotates pairs ``(x[2i], x[2i+1])`` (MLA),
        else ``(x[i], x[i + d/2])`` (NeoX half-split, the indexer)."""
        half = cos.shape[1]
        device = cos.device
        if interleaved:
            full_cos = cos.repeat_interleave(2, dim=1)
            full_sin = torch.stack((-sin, sin), dim=-1).flatten(1)
            perm = torch.arange(2 * half, device=device).view(half, 2).flip(-1).flatten()
        else:
            full_cos = torch.cat((cos, cos), dim=1)
            full_sin = torch.cat((-sin, sin), dim=1)
            perm = torch.arange(2 * half, device=device).roll(half)
        rest = width - 2 * half
        if rest:
            full_cos = torch.cat((full_cos, full_cos.new_ones(cos.shape[0], rest)), dim=1)
            full_sin = torch.cat((full_sin, full_sin.new_zeros(cos.shape[0], rest)), dim=1)
            perm = torch.cat((perm, torch.arange(2 * half, width, device=device)))
        return cls(full_cos, full_sin, perm)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` ``[T, ..., width]``."""
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        return x * self.cos.view(shape) + x.index_select(-1, self.perm) * self.sin.view(shape)


@dataclass(frozen=True)
class RopeTables:
    """The rotations of one step: MLA's interleaved rope dims and the indexer's half-split (partial) head."""

    mla: Rotary
    indexer: Rotary | None

    @classmethod
    def build(cls, inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype,
              index_head_dim: int) -> RopeTables:
        cos, sin = rope_cos_sin(inv_freq, positions, dtype)
        mla = Rotary.build(cos, sin, 2 * cos.shape[1], interleaved=True)
        return cls(mla, Rotary.build(cos, sin, index_head_dim, interleaved=False) if index_head_dim else None)
