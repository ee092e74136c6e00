"""``MLAWeights``: the absorbed parts of ``W_kvb`` (fp32 on a CPU while they fit its cache, else the compute dtype)
give the decode the products the compute dtype gives, and the absorbed decode agrees with the expanded
(non-absorbed) attention."""

from __future__ import annotations

import pytest
import torch

from dsv32.kernels import attention, reference
from dsv32.kernels.attention import MLAWeights

from .helpers import causal_topk, fill_cache, make_cache, scattered_slots

NUM_SLOTS = 256
SCALE = 0.1352
N_HEADS, NOPE = 4, 32


@pytest.mark.parametrize("dtype", [None, torch.float32])
def test_absorbed_parts_are_contiguous_copies_of_w_kvb(dtype: torch.dtype | None) -> None:
    w_kvb = torch.randn(N_HEADS * (NOPE + 16), 64).to(torch.bfloat16)
    weights = MLAWeights.from_kv_b(w_kvb, N_HEADS, NOPE, dtype)
    w = w_kvb.to(dtype or torch.bfloat16).view(N_HEADS, -1, 64)
    assert weights.w_uk.dtype == weights.w_uv.dtype == (dtype or torch.bfloat16)
    assert weights.w_uk.is_contiguous() and weights.w_uv.is_contiguous()
    assert torch.equal(weights.w_uk, w[:, :NOPE]) and torch.equal(weights.w_uv, w[:, NOPE:].transpose(1, 2))


def test_absorbed_weights_are_fp32_only_while_they_fit_the_cpu_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "last_level_cache_bytes", lambda: 32 << 20)
    cpu = torch.device("cpu")
    assert attention.absorbed_dtype(cpu, torch.bfloat16, (8 << 20) // 4) == torch.float32  # 8 MiB in fp32: fits
    assert attention.absorbed_dtype(cpu, torch.bfloat16, (32 << 20) // 4) == torch.bfloat16  # streamed: bf16
    assert attention.absorbed_dtype(torch.device("cuda"), torch.bfloat16, 1) == torch.bfloat16


@pytest.mark.parametrize(("text", "size"), [("32768K\n", 32 << 20), ("1M", 1 << 20), ("4194304", 4 << 20),
                                            ("", attention.DEFAULT_LLC_BYTES), ("lots", attention.DEFAULT_LLC_BYTES),
                                            (None, attention.DEFAULT_LLC_BYTES)])
def test_last_level_cache_size_is_read_from_sysfs_or_defaulted(tmp_path, text: str | None, size: int) -> None:
    path = tmp_path / "size"
    if text is not None:
        path.write_text(text)
    assert attention.last_level_cache_bytes(str(path)) == size


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


def test_sparse_prefill_expands_only_selected_rows_bit_identically() -> None:
    """``mla_prefill`` with a top-k restriction up-projects only the selected context rows: the same bits as its
    plain form, which expands every row of the context, in bf16 (the CPU compute dtype; oneDNN's product of a row does
    not depend on how many rows are multiplied). fp32 goes to MKL, whose few-row (GEMV) paths round differently:
    there the two agree to rounding."""
    gen = torch.Generator().manual_seed(1)
    for fmt, dtype in (("auto", torch.bfloat16), ("auto", torch.float32), ("fp8", torch.bfloat16)):
        cache = make_cache(fmt, dtype, NUM_SLOTS, index_head_dim=0)
        context = scattered_slots(200, NUM_SLOTS, gen)
        fill_cache(cache, context, gen)
        w_kvb = (torch.randn(N_HEADS * (NOPE + 32), 512, generator=gen) * 0.05).to(dtype)
        weights = MLAWeights.from_kv_b(w_kvb, N_HEADS, NOPE)
        for start, n, topk in ((150, 50, 16), (190, 10, 64), (0, 12, 4)):
            length = start + n
            positions = torch.arange(start, length)
            q_nope = torch.randn(n, N_HEADS, NOPE, generator=gen).to(dtype)
            q_pe = torch.randn(n, N_HEADS, 64, generator=gen).to(dtype)
            topk_positions = causal_topk(positions, topk, gen)
            args = (q_nope, q_pe, weights, cache.latent[0], cache.layout, context[:length], positions,
                    topk_positions, SCALE)
            got = reference.mla_prefill(*args)
            expected = reference.mla_prefill_expand_all(*args)
            assert got.dtype == expected.dtype == dtype
            if dtype == torch.bfloat16:
                assert torch.equal(got, expected), (fmt, start, n, topk)
            else:
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
