"""The CPU backend's tiled long-context ops against the reference (the oracle): the indexer's selections equal up to
ties, over many key tiles and query blocks; sparse prefill attention equal to rounding; the whole model's logits and
greedy tokens equal past ``index_topk``."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import dsv32.kernels as kernels
from dsv32.config import tiny_config
from dsv32.kernels import reference, tiled
from dsv32.kernels.attention import MLAWeights
from dsv32.model.loader import load_model
from tests.model.conftest import single_sequence_batch

from .helpers import causal_topk, fill_cache, make_cache, scattered_slots

NUM_SLOTS = 1024
SCALE = 0.1352


def _oracle_scores(q, weights, cache, slot_table, kv_lens):
    """The reference's index scores, ``-inf`` where a query does not see the position, and the bound by which the
    backend's may differ: 0 where it scores in fp32 as the reference does; with a bf16 ``auto`` cache (each head's
    dot rounded to bf16, relative error <= 2^-9) ``2^-9 sum_h |w_h| ReLU(q_h . k D^-0.5)``, its largest per query."""
    batch, length = slot_table.shape
    keys = reference.read_index_rows(cache.index_k[0][slot_table.flatten()], cache.layout).view(batch, length, -1)
    q = reference.prepare_index_q(q, cache.layout)
    scores = reference.indexer_scores(q, weights, keys)
    bound = torch.zeros(batch, q.shape[1], 1)
    if cache.layout.fmt == "auto" and cache.index_k[0].dtype == torch.bfloat16:
        bound = 2 ** -9 * reference.indexer_scores(q, weights.abs(), keys).amax(-1, keepdim=True)
    return scores.masked_fill(torch.arange(length) >= kv_lens[..., None], float("-inf")), bound


def _assert_same_selection(got, expected, oracle):
    """Equal up to ties and rounding: the same ``-1`` padding, and the chosen positions' reference scores, sorted,
    agree within twice the rounding bound (a key swapped for another at the top-k boundary moves each sorted score by
    at most the two keys' difference); exactly where the backend scores in fp32."""
    scores, bound = oracle
    assert got.shape == expected.shape
    assert torch.equal((got < 0).sum(-1), (expected < 0).sum(-1))
    picked = [scores.gather(-1, chosen.clamp(min=0)).masked_fill(chosen < 0, 0).sort(-1).values
              for chosen in (got, expected)]
    assert ((picked[0] - picked[1]).abs() <= 2 * bound).all()


@pytest.mark.parametrize(("fmt", "dtype"), [("auto", torch.bfloat16), ("auto", torch.float32),
                                            ("fp8", torch.bfloat16)])
@pytest.mark.parametrize(("batch", "n", "length", "lens", "topk"), [
    (1, 200, 900, "causal", 64),       # a prefill chunk at the end of its context, past the top-k
    (1, 40, 60, "causal", 64),         # a first chunk shorter than the top-k: everything visible is selected
    (3, 1, 700, [700, 333, 50], 64),   # decodes with ragged contexts, one shorter than the top-k
])
def test_indexer_topk_selects_what_the_reference_selects(fmt, dtype, batch, n, length, lens, topk,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(0)
    cache = make_cache(fmt, dtype, NUM_SLOTS)
    slot_table = torch.stack([scattered_slots(length, NUM_SLOTS, gen) for _ in range(batch)])
    for row in slot_table:
        fill_cache(cache, row, gen)
    q = torch.randn(batch, n, 16, 128, generator=gen).to(dtype)
    weights = torch.randn(batch, n, 16, generator=gen)
    kv_lens = torch.arange(length - n + 1, length + 1)[None] if lens == "causal" else torch.tensor(lens)[:, None]
    args = (q, weights, cache.index_k[0], cache.layout, slot_table, kv_lens, topk)
    expected = reference.indexer_topk(*args)
    scores = _oracle_scores(q, weights, cache, slot_table, kv_lens)
    _assert_same_selection(tiled.indexer_topk(*args), expected, scores)
    # Small tiles: many key tiles merged into the running top-k, and several query blocks.
    monkeypatch.setattr(tiled, "TILE_ELEMENTS", 1 << 15)
    monkeypatch.setattr(tiled, "MIN_KEY_TILE", 32)
    _assert_same_selection(tiled.indexer_topk(*args), expected, scores)


def test_indexer_reads_no_key_past_the_causal_horizon(monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk's queries see only positions before their own: the key tiles stop at the block's horizon, so the
    rows of the context's later positions (here garbage slots past the cache) are never read."""
    gen = torch.Generator().manual_seed(1)
    cache = make_cache("auto", torch.float32, NUM_SLOTS)
    slots = scattered_slots(300, NUM_SLOTS, gen)
    fill_cache(cache, slots, gen)
    slot_table = torch.cat((slots, torch.full((500,), 10 * NUM_SLOTS)))[None]  # positions >= 300: invalid slots
    q, weights = torch.randn(1, 20, 16, 128, generator=gen), torch.randn(1, 20, 16, generator=gen)
    kv_lens = torch.arange(281, 301)[None]
    monkeypatch.setattr(tiled, "MIN_KEY_TILE", 64)
    got = tiled.indexer_topk(q, weights, cache.index_k[0], cache.layout, slot_table, kv_lens, 64)
    expected = reference.indexer_topk(q, weights, cache.index_k[0], cache.layout, slot_table[:, :300], kv_lens, 64)
    _assert_same_selection(got, expected, _oracle_scores(q, weights, cache, slot_table[:, :300], kv_lens))


@pytest.mark.parametrize(("fmt", "dtype", "tolerance"), [("auto", torch.float32, 1e-5), ("auto", torch.bfloat16, 2e-2),
                                                         ("fp8", torch.bfloat16, 2e-2)])
def test_sparse_prefill_attends_the_selected_rows_as_the_reference(fmt, dtype, tolerance,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(2)
    n_heads, nope = 4, 32
    cache = make_cache(fmt, dtype, NUM_SLOTS, index_head_dim=0)
    context = scattered_slots(600, NUM_SLOTS, gen)
    fill_cache(cache, context, gen)
    weights = MLAWeights.from_kv_b((torch.randn(n_heads * (nope + 32), 512, generator=gen) * 0.05).to(dtype),
                                   n_heads, nope)
    positions = torch.arange(500, 600)
    q_nope = torch.randn(100, n_heads, nope, generator=gen).to(dtype)
    q_pe = torch.randn(100, n_heads, 64, generator=gen).to(dtype)
    for topk_positions in (causal_topk(positions, 48, gen), None):
        args = (q_nope, q_pe, weights, cache.latent[0], cache.layout, context, positions, topk_positions, SCALE)
        expected = reference.mla_prefill(*args).float()
        # The expanded form, then the absorbed one (gathering priced at nothing); each in one query block, then in
        # blocks of a few queries.
        for gather_cost in (10**9, 0):
            monkeypatch.setattr(tiled, "GATHERED_ELEMENT_COST", gather_cost)
            for tile_elements in (1 << 23, 4096):
                monkeypatch.setattr(tiled, "TILE_ELEMENTS", tile_elements)
                monkeypatch.setattr(tiled, "GATHER_ELEMENTS", tile_elements * 4)
                got = tiled.mla_prefill(*args)
                assert got.dtype == dtype
                assert (got.float() - expected).abs().max() <= tolerance * expected.abs().max()


def test_the_absorbed_form_is_chosen_where_the_chunk_is_small_against_its_selected_rows() -> None:
    layout = make_cache("auto", torch.bfloat16, 16, index_head_dim=0).layout
    # issue 26's tiny model (4 heads of 32 + 64 / 32) at 16K context, top-2048: the union of a chunk's selections
    # is nearly the whole context; a short chunk gathers less than the whole context's up-projection costs.
    assert tiled.absorbed_is_cheaper(16, 2048, 16000, 4, 32, 32, layout)
    assert not tiled.absorbed_is_cheaper(1024, 2048, 16000, 4, 32, 32, layout)
    # The real model's 128 heads: the up-projection of the selected rows dwarfs any gathering.
    assert tiled.absorbed_is_cheaper(2048, 2048, 16000, 128, 128, 128, layout)


def _greedy_run(model, prompt: torch.Tensor, chunk: int, num_decodes: int) -> tuple[torch.Tensor, list[int]]:
    """Prefill ``prompt`` in chunks, then greedy-decode: (the logits of every step's last token, the tokens)."""
    block = 16
    table = list(range(-(-(prompt.numel() + num_decodes) // block)))
    cache = model.allocate_kv_cache(len(table), block, "auto")
    logits = []
    for start in range(0, prompt.numel(), chunk):
        ids = prompt[start:start + chunk]
        logits.append(model.compute_logits(model(single_sequence_batch(ids, start, table, block), cache))[-1])
    tokens = [int(logits[-1].argmax())]
    for t in range(prompt.numel(), prompt.numel() + num_decodes - 1):
        logits.append(model.compute_logits(model(single_sequence_batch(torch.tensor(tokens[-1:]), t, table, block),
                                                 cache))[-1])
        tokens.append(int(logits[-1].argmax()))
    return torch.stack(logits), tokens


@pytest.mark.parametrize(("prompt_len", "chunk"), [(400, 128), (4096, 1024)])
def test_model_logits_and_greedy_tokens_equal_the_reference_past_the_top_k(prompt_len, chunk,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny V3.2 model (top-64) in fp32 on the torch backend against the same model on the reference ops."""
    config = dataclasses.replace(tiny_config(), num_hidden_layers=2, index_topk=64)
    model = load_model(config, None, load_format="dummy", dtype="float32", progress=False)
    prompt = torch.randint(0, 1000, (prompt_len,), generator=torch.Generator().manual_seed(3))

    def run(backend: kernels.KernelBackend) -> tuple[torch.Tensor, list[int]]:
        monkeypatch.setattr(kernels, "_backend_for", lambda device_type: backend)
        return _greedy_run(model, prompt, chunk, num_decodes=4)

    expected_logits, expected_tokens = run(kernels.ModuleBackend("reference", reference))
    logits, tokens = run(kernels.TORCH_BACKEND)
    assert tokens == expected_tokens
    assert (logits - expected_logits).abs().max().item() <= 1e-4


def test_topk_over_a_dynamic_width_compiles_to_a_static_selection() -> None:
    """Compiled over a context width the graph keeps dynamic (as the decode graphs do), ``select_topk`` returns
    exactly ``topk`` positions with a static shape once the width exceeds it: a symbolic ``min(topk, width)`` would
    make every product over the selected rows dynamic too (ATen's GEMMs instead of fixed-shape kernels)."""
    from torch._dynamo.testing import EagerAndRecordGraphs

    topk = 8
    backend = EagerAndRecordGraphs()
    select = torch.compile(lambda s, a: reference.select_topk(s, a, topk), backend=backend, fullgraph=True)
    for width in (40, 57):
        scores = torch.randn(2, width, generator=torch.Generator().manual_seed(width))
        allowed = torch.arange(width) < torch.tensor([[width], [5]])
        torch._dynamo.mark_dynamic(scores, 1)
        torch._dynamo.mark_dynamic(allowed, 1)
        chosen = select(scores, allowed)
        assert torch.equal(chosen.sort(-1).values, reference.select_topk(scores, allowed, topk).sort(-1).values)
    assert len(backend.graphs) == 1  # one graph serves both widths
    (output,) = [node for node in backend.graphs[0].graph.nodes if node.op == "output"]
    shape = output.args[0][0].meta["example_value"].shape
    assert all(isinstance(size, int) for size in shape) and shape[-1] == topk


def test_bucketed_rows_cover_the_count_with_few_distinct_shapes() -> None:
    """Row counts padded for oneDNN's GEMM shapes: never fewer rows, at most ~12.5% (or 15 rows) more, and a few
    buckets across a range of counts (each new shape costs a primitive build and a cache entry)."""
    for n in range(1, 5000):
        padded = reference.bucketed_rows(n)
        assert n <= padded <= max(n + 15, n * 1.125 + 1)
    assert len({reference.bucketed_rows(n) for n in range(582, 784)}) <= 4  # the MoE groups of one 8 x 128 prefill
    assert reference.bucketed_rows(124) == reference.bucketed_rows(128) == 128
