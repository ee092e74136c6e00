"""Shared builders for the kernel tests: paged caches filled at scattered slots, in either storage format; integer
weights in each quantised format."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv32.kernels.cache_format import CacheLayout
from dsv32.kernels.quant import IntWeight, quantize_int4, quantize_int8, reference_linear
from dsv32.model.cache import KVCache


def make_cache(fmt: str, dtype: torch.dtype, num_slots: int, kv_lora_rank: int = 512, rope_dim: int = 64,
               index_head_dim: int = 128, device: torch.device | str = "cpu") -> KVCache:
    """A one-layer cache of ``num_slots`` slots (blocks of 16) in format ``fmt``."""
    layout = CacheLayout(kv_lora_rank, rope_dim, index_head_dim, fmt, dtype)
    return KVCache(layout, 1, -(-num_slots // 16), 16, torch.device(device))


def scattered_slots(num: int, num_slots: int, gen: torch.Generator) -> torch.Tensor:
    """``num`` distinct slots in random order (contexts are paged, not contiguous)."""
    return torch.randperm(num_slots, generator=gen)[:num]


def fill_cache(cache: KVCache, slots: torch.Tensor, gen: torch.Generator) -> None:
    """Random latents, rope keys and indexer keys at ``slots`` (written through the cache's own encoders)."""
    lay = cache.layout
    n = slots.numel()
    c = (torch.randn(n, lay.kv_lora_rank, generator=gen)).to(lay.dtype)
    k_pe = torch.randn(n, lay.rope_dim, generator=gen).to(lay.dtype)
    cache.write_latent(0, slots, c, k_pe)
    if lay.index_head_dim:
        cache.write_index_k(0, slots, torch.randn(n, lay.index_head_dim, generator=gen).to(lay.dtype))


def causal_topk(positions: torch.Tensor, topk: int, gen: torch.Generator) -> torch.Tensor:
    """Random top-k selections of causal context positions per query, ``-1`` padded (as ``select_topk`` returns)."""
    rows = []
    for pos in positions.tolist():
        chosen = torch.randperm(pos + 1, generator=gen)[:topk]
        rows.append(torch.cat((chosen, torch.full((topk - chosen.numel(),), -1, dtype=torch.long))))
    return torch.stack(rows)


def act_order(weight: IntWeight, seed: int = 3) -> IntWeight:
    """``weight``'s codes, scales and zeros as stored, its groups' columns scattered over K (GPTQ's ``g_idx``)."""
    g_idx = torch.randperm(weight.shape[1], generator=torch.Generator().manual_seed(seed)) // weight.group_size
    return IntWeight(4, weight.q, weight.scale, weight.zero, weight.group_size, g_idx.int())


# Each quantised format, as a function of the [N, K] weight (K a multiple of 128).
INT_FORMATS = {
    "int8": quantize_int8,
    "w8a8": lambda w: quantize_int8(w, act_quant=True),
    "int4": lambda w: quantize_int4(w, 128),
    "int4_zero": lambda w: quantize_int4(w, 128, symmetric=False),
    "int4_act_order": lambda w: act_order(quantize_int4(w, 64, symmetric=False)),
}


def int_moe_reference(x: torch.Tensor, w13: list[IntWeight], w2: list[IntWeight], weights: torch.Tensor,
                      ids: torch.Tensor) -> torch.Tensor:
    """Token by token, slot by slot: each routed expert's two dequantise-then-matmul products (``reference_linear``,
    activations rounded per token for W8A8), weighted and summed in fp32. Ids outside the experts add nothing."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for j, e in enumerate(ids[t].tolist()):
            if 0 <= e < len(w13):
                gate, up = reference_linear(x[t:t + 1], w13[e]).chunk(2, dim=-1)
                out[t] += weights[t, j] * reference_linear(F.silu(gate) * up, w2[e])[0].float()
    return out
