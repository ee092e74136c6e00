"""Triton sparse MLA (absorbed, 576/512 wide) against the torch references: the raw kernel on sparse, dense-decode
and dense-prefill key lists, and the model-level decode / prefill ops (absorbed kernel vs expanded reference)."""

from __future__ import annotations

import pytest
import torch

from dsv32.kernels import reference
from dsv32.kernels.attention import MLAWeights

from .conftest import needs_triton
from .helpers import fill_cache, make_cache, scattered_slots

pytestmark = needs_triton

NUM_SLOTS = 256
SCALE = 0.1352


def _close(got: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    got, expected = got.float().cpu(), expected.float()
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= rel * expected.abs().max()


@pytest.mark.parametrize("fmt", ["auto", "fp8"])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_sparse_decode_kernel_matches_reference(fmt: str, num_splits: int, device: torch.device) -> None:
    from dsv32.kernels import triton_mla

    gen = torch.Generator().manual_seed(0)
    cache = make_cache(fmt, torch.bfloat16, NUM_SLOTS)
    fill_cache(cache, torch.arange(NUM_SLOTS), gen)
    n_heads, n_keys = 128, 80
    kv_slots = torch.stack([scattered_slots(n_keys, NUM_SLOTS, gen) for _ in range(3)])
    kv_slots[0, ::7] = -1  # top-k padding inside the list
    kv_slots[2] = -1  # a query with no key at all
    kv_lens = torch.tensor([n_keys, 33, n_keys])
    q = torch.randn(3, n_heads, 576, generator=gen).to(torch.bfloat16)
    o_ref, lse_ref = reference.sparse_mla_attention(q, cache.latent[0], cache.layout, kv_slots, kv_lens, SCALE)
    o, lse = triton_mla.sparse_mla_attention(q.to(device), cache.latent[0].to(device), cache.layout,
                                             kv_slots.to(device), kv_lens.to(device), SCALE, num_splits=num_splits)
    _close(o, o_ref, 2e-2)
    assert torch.equal(torch.isfinite(lse.cpu()), torch.isfinite(lse_ref))
    assert torch.allclose(lse.cpu()[:2], lse_ref[:2], atol=1e-2)
    assert bool((o.cpu()[2] == 0).all())


@pytest.mark.parametrize("fmt", ["auto", "fp8"])
def test_dense_prefill_kernel_with_shared_slot_table(fmt: str, device: torch.device) -> None:
    from dsv32.kernels import triton_mla

    gen = torch.Generator().manual_seed(1)
    cache = make_cache(fmt, torch.bfloat16, NUM_SLOTS)
    slots = scattered_slots(70, NUM_SLOTS, gen)
    fill_cache(cache, slots, gen)
    positions = torch.arange(64, 70)
    q = torch.randn(6, 16, 576, generator=gen).to(torch.bfloat16)
    kv_slots = slots[None].expand(6, -1)
    o_ref, _ = reference.sparse_mla_attention(q, cache.latent[0], cache.layout, kv_slots, positions + 1, SCALE)
    o, _ = triton_mla.sparse_mla_attention(q.to(device), cache.latent[0].to(device), cache.layout,
                                           slots.to(device)[None].expand(6, -1), (positions + 1).to(device), SCALE)
    _close(o, o_ref, 2e-2)


def _model_case(fmt: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    cache = make_cache(fmt, torch.float32, NUM_SLOTS, index_head_dim=0)
    n_heads, nope, v_dim = 4, 64, 32
    w_kvb = torch.randn(n_heads * (nope + v_dim), 512, generator=gen) * 0.05
    return gen, cache, n_heads, nope, w_kvb


@pytest.mark.parametrize("fmt", ["auto", "fp8"])
@pytest.mark.parametrize("sparse", [False, True])
def test_model_decode_op_matches_reference(fmt: str, sparse: bool, device: torch.device) -> None:
    from dsv32.kernels import triton_mla

    gen, cache, n_heads, nope, w_kvb = _model_case(fmt, 2)
    slot_table = torch.stack([scattered_slots(60, NUM_SLOTS, gen) for _ in range(2)])
    for row in slot_table:
        fill_cache(cache, row, gen)
    kv_lens = torch.tensor([60, 41])
    topk = None
    if sparse:
        topk = torch.stack([torch.randperm(int(n), generator=gen)[:24] for n in kv_lens])
        topk[1, 20:] = -1
    q_nope = torch.randn(2, n_heads, nope, generator=gen)
    q_pe = torch.randn(2, n_heads, 64, generator=gen)
    weights = MLAWeights.from_kv_b(w_kvb, n_heads, nope)
    expected = reference.mla_decode(q_nope, q_pe, weights, cache.latent[0], cache.layout, slot_table, kv_lens, topk,
                                    SCALE)
    got = triton_mla.mla_decode(q_nope.to(device), q_pe.to(device), MLAWeights.from_kv_b(w_kvb.to(device), n_heads,
                                nope), cache.latent[0].to(device), cache.layout, slot_table.to(device),
                                kv_lens.to(device), topk.to(device) if sparse else None, SCALE)
    _close(got, expected, 1e-4 if fmt == "auto" else 1e-3)


@pytest.mark.parametrize("sparse", [False, True])
def test_model_prefill_op_absorbed_matches_expanded_reference(sparse: bool, device: torch.device) -> None:
    from dsv32.kernels import triton_mla

    gen, cache, n_heads, nope, w_kvb = _model_case("auto", 3)
    slots = scattered_slots(50, NUM_SLOTS, gen)
    fill_cache(cache, slots, gen)
    positions = torch.arange(40, 50)
    topk = None
    if sparse:
        topk = torch.stack([torch.randperm(int(p) + 1, generator=gen)[:16] for p in positions])
    q_nope = torch.randn(10, n_heads, nope, generator=gen)
    q_pe = torch.randn(10, n_heads, 64, generator=gen)
    expected = reference.mla_prefill(q_nope, q_pe, MLAWeights.from_kv_b(w_kvb, n_heads, nope), cache.latent[0],
                                     cache.layout, slots, positions, topk, SCALE)
    got = triton_mla.mla_prefill(q_nope.to(device), q_pe.to(device), MLAWeights.from_kv_b(w_kvb.to(device), n_heads,
                                 nope), cache.latent[0].to(device),
                                 cache.layout, slots.to(device), positions.to(device),
                                 topk.to(device) if sparse else None, SCALE)
    _close(got, expected, 1e-4)
