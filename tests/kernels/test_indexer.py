"""Triton lightning-indexer scores + top-k over the paged (auto / FP8) key cache against the torch reference."""

from __future__ import annotations

import pytest
import torch

from dsv32.kernels import reference

from .conftest import needs_triton
from .helpers import fill_cache, make_cache, scattered_slots

pytestmark = needs_triton

NUM_SLOTS = 256


def _reference_scores(q, weights, cache, slot_table, kv_lens):
    batch, length = slot_table.shape
    keys = reference.read_index_rows(cache.index_k[0][slot_table.flatten()], cache.layout).view(batch, length, -1)
    scores = reference.indexer_scores(reference.prepare_index_q(q, cache.layout), weights, keys)
    allowed = torch.arange(length) < kv_lens[..., None]
    return scores.masked_fill(~allowed, float("-inf"))


def _case(fmt, n_heads, batch, n, length, kv_lens, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cache = make_cache(fmt, torch.bfloat16, NUM_SLOTS)
    slot_table = torch.stack([scattered_slots(length, NUM_SLOTS, gen) for _ in range(batch)])
    for row in slot_table:
        fill_cache(cache, row, gen)
    q = torch.randn(batch, n, n_heads, 128, generator=gen).to(torch.bfloat16)
    weights = torch.randn(batch, n, n_heads, generator=gen)
    return cache, slot_table, q, weights, torch.as_tensor(kv_lens).view(batch, n)


def _to(device, *tensors):
    return [t.to(device) for t in tensors]


@pytest.mark.parametrize("fmt", ["auto", "fp8"])
@pytest.mark.parametrize(("n_heads", "batch", "n", "length", "kv_lens"), [
    (64, 3, 1, 100, [100, 57, 20]),          # decode: 64 real heads, ragged contexts, one shorter than top-k
    (8, 1, 12, 90, list(range(79, 91))),     # prefill chunk: causal limits position + 1
])
def test_scores_and_topk_match_reference(fmt, n_heads, batch, n, length, kv_lens, device, monkeypatch):
    from dsv32.kernels import triton_indexer

    topk = 32
    cache, slot_table, q, weights, kv_lens = _case(fmt, n_heads, batch, n, length, kv_lens, device)
    expected = _reference_scores(q, weights, cache, slot_table, kv_lens)
    index_cache = cache.index_k[0].to(device)
    q_d, w_d, table_d, lens_d = _to(device, q, weights, slot_table, kv_lens)
    got = triton_indexer.indexer_scores(q_d, w_d, index_cache, cache.layout, table_d, lens_d).cpu()
    finite = torch.isfinite(expected)
    assert torch.equal(finite, torch.isfinite(got))
    scale = expected[finite].abs().max()
    assert (got[finite] - expected[finite]).abs().max() <= 1e-4 * scale

    ref_chosen = reference.indexer_topk(q, weights, cache.index_k[0], cache.layout, slot_table, kv_lens, topk)
    # One key tile, then tiles of 64 keys (two here) merged into a running top-k.
    for logits_elements in (triton_indexer.LOGITS_ELEMENTS, 1):
        monkeypatch.setattr(triton_indexer, "LOGITS_ELEMENTS", logits_elements)
        chosen = triton_indexer.indexer_topk(q_d, w_d, index_cache, cache.layout, table_d, lens_d, topk).cpu()
        assert chosen.shape == ref_chosen.shape == (batch, n, topk)
        # the same number of real picks per row, all visible, distinct, and as good as the reference's (robust to
        # ties)
        assert torch.equal((chosen >= 0).sum(-1), (ref_chosen >= 0).sum(-1))
        assert torch.equal((ref_chosen >= 0).sum(-1), kv_lens.clamp(max=topk))
        assert bool(((chosen < kv_lens[..., None]) | (chosen < 0)).all())
        for row, ref_row, scores in zip(chosen.flatten(0, 1), ref_chosen.flatten(0, 1), expected.flatten(0, 1),
                                        strict=True):
            picked, ref_picked = row[row >= 0], ref_row[ref_row >= 0]
            assert picked.unique().numel() == picked.numel()
            assert torch.allclose(scores[picked].sort().values, scores[ref_picked].sort().values,
                                  atol=1e-4 * float(scale))
