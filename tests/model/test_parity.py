"""Logit parity with HF transformers (DeepseekV3 / DeepseekV32) in float32, full and incremental forwards."""

from __future__ import annotations

import pytest
import torch

from dsv32.config import ModelConfig
from dsv32.model.loader import load_model

from .conftest import VOCAB, multi_sequence_batch, single_sequence_batch

BLOCK = 16
SEQ_LEN = 50  # > index_topk (16): the indexer really prunes


def _hf_logits(path: str, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(ids[None]).logits[0].float()


def _ours(path: str):
    return load_model(ModelConfig.from_pretrained(path), path, dtype="float32", progress=False)


@pytest.mark.parametrize("arch", ["v32", "v3"])
def test_logits_match_hf(hf_checkpoints: dict[str, str], arch: str) -> None:
    path = hf_checkpoints[arch]
    ids = torch.randint(0, VOCAB, (SEQ_LEN,), generator=torch.Generator().manual_seed(1))
    model = _ours(path)
    assert model.config.has_indexer == (arch == "v32")
    cache = model.allocate_kv_cache(8, BLOCK, "auto")
    ours = model.compute_logits(model(single_sequence_batch(ids, 0, [3, 1, 6, 2], BLOCK), cache))
    ref = _hf_logits(path, ids)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", ["v32", "v3"])
def test_incremental_decode_matches_full_forward(hf_checkpoints: dict[str, str], arch: str) -> None:
    model = _ours(hf_checkpoints[arch])
    ids = torch.randint(0, VOCAB, (SEQ_LEN,), generator=torch.Generator().manual_seed(2))
    table = [5, 0, 7, 2]
    full = model.compute_logits(model(single_sequence_batch(ids, 0, table, BLOCK), model.allocate_kv_cache(8, BLOCK,
                                                                                                            "auto")))
    cache = model.allocate_kv_cache(8, BLOCK, "auto")
    prefix = 21
    steps = [model.compute_logits(model(single_sequence_batch(ids[:prefix], 0, table, BLOCK), cache))]
    chunk = 9  # a second prefill chunk on top of cached context, then single-token decodes
    steps.append(model.compute_logits(model(single_sequence_batch(ids[prefix:prefix + chunk], prefix, table, BLOCK),
                                            cache)))
    for t in range(prefix + chunk, SEQ_LEN):
        steps.append(model.compute_logits(model(single_sequence_batch(ids[t:t + 1], t, table, BLOCK), cache)))
    assert (torch.cat(steps) - full).abs().max().item() <= 1e-4


def test_mixed_batch_matches_separate_runs(hf_checkpoints: dict[str, str]) -> None:
    """A prefill chunk and two decodes (different context lengths) in one flat batch == each run alone."""
    model = _ours(hf_checkpoints["v32"])
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, VOCAB, (n,), generator=gen) for n in (40, 25, 30)]
    tables = [[0, 1, 2], [3, 4], [5, 6]]
    cache = model.allocate_kv_cache(8, BLOCK, "auto")
    # prime: seq0 has 0 cached, seq1 has 24 cached, seq2 has 29 cached
    model(single_sequence_batch(seqs[1][:24], 0, tables[1], BLOCK), cache)
    model(single_sequence_batch(seqs[2][:29], 0, tables[2], BLOCK), cache)
    batch = multi_sequence_batch([(seqs[0][:33], 0, tables[0]), (seqs[1][24:], 24, tables[1]),
                                  (seqs[2][29:], 29, tables[2])], BLOCK)
    mixed = model.compute_logits(model(batch, cache)[batch.last_token_indices()])
    for b, seq in enumerate(seqs):
        alone = model.allocate_kv_cache(8, BLOCK, "auto")
        n = 33 if b == 0 else len(seq)
        ref = model.compute_logits(model(single_sequence_batch(seq[:n], 0, tables[b], BLOCK), alone))[-1]
        assert (mixed[b] - ref).abs().max().item() <= 1e-4
