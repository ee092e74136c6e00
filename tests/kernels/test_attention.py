"""``MLAWeights``: the absorbed parts of ``W_kvb`` (fp32 on a CPU) give the decode the products the compute dtype
gives, and the absorbed decode agrees with the expanded (non-absorbed) attention."""

from __future__ import annotations

import torch

from dsv32.kernels import reference
from dsv32.kernels.attention import MLAWeights

from .helpers import fill_cache, make_cache, scattered_slots

NUM_SLOTS = 256
SCALE = 0.1352
N_HEADS, NOPE = 4, 32


def test_absorbed_parts_are_contiguous_fp32_copies_of_w_kvb_on_cpu() -> None:
    w_kvb = torch.randn(N_HEADS * (NOPE + 16), 64).to(torch.bfloat16)
    weights = MLAWeights.from_kv_b(w_kvb, N_HEADS, NOPE)
    w = w_kvb.float().view(N_HEADS, -1, 64)
    assert weights.w_uk.dtype == weights.w_uv.dtype == torch.float32
    assert weights.w_uk.is_contiguous() and weights.w_uv.is_contiguous()
    assert torch.equal(weights.w_uk, w[:, :NOPE]) and torch.equal(weights.w_uv, w[:, NOPE:].transpose(1, 2))


def test_bf16_decode_matches_compute_dtype_absorption_and_the_expanded_form() -> None:
    gen = torch.Generator().manual_seed(0)
    cache = make_cache("auto", torch.bfloat16, NUM_SLOTS, index_head_dim=0)
    slot_table = torch.stack([scattered_slots(60, NUM_SLOTS, gen) for _ in range(3)])
    for row in slot_table:
        fill_cache(cache, row, gen)
    kv_lens = torch.tensor([60, 41, 7])
    w_kvb = (torch.randn(N_HEADS * (NOPE + 32), 512, generator=gen) * 0.05).to(torch.bfloat16)
    q_nope = torch.randn(3, N_HEADS, NOPE, generator=gen).to(torch.bfloat16)
    q_pe = torch.randn(3, N_HEADS, 64, generator=gen).to(torch.bfloat16)
    weights = MLAWeights.from_kv_b(w_kvb, N_HEADS, NOPE)
    got = reference.mla_decode(q_nope, q_pe, weights, cache.latent[0], cache.layout, slot_table, kv_lens, None, SCALE)
    assert got.dtype == torch.bfloat16

    w = w_kvb.view(N_HEADS, -1, 512)  # the absorbed parts in the compute dtype: the plain bf16 products
    bf16_weights = MLAWeights(w_kvb, w[:, :NOPE], w[:, NOPE:].transpose(1, 2))
    plain = reference.mla_decode(q_nope, q_pe, bf16_weights, cache.latent[0], cache.layout, slot_table, kv_lens, None,
                                 SCALE)
    assert (got.float() - plain.float()).abs().max() <= 1e-2 * plain.float().abs().max()

    for b, length in enumerate(kv_lens.tolist()):  # the last query of the expanded form over the same context
        position = torch.tensor([length - 1])
        expanded = reference.mla_prefill(q_nope[b:b + 1], q_pe[b:b + 1], weights, cache.latent[0], cache.layout,
                                         slot_table[b, :length], position, None, SCALE)
        assert (got[b].float() - expanded[0].float()).abs().max() <= 3e-2 * expanded.float().abs().max()
