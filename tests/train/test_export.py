"""An exported demo checkpoint is a real V3.2 checkpoint: dsv32 and HF transformers load it and compute the trainer's
logits (fp32, within 1e-4), main model and MTP layer, with sparse attention really pruning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dsv32.config import ModelConfig
from dsv32.model.loader import load_model
from dsv32.train.demo import toy_config
from dsv32.train.export import export_checkpoint
from dsv32.train.network import TrainableDeepseekV32
from tests.model.conftest import single_sequence_batch

SEQ_LEN = 40  # > the toy's index_topk (16): sparse attention prunes
BLOCK = 16
COMPACT_VOCAB = 300


def _randomize(model: TrainableDeepseekV32, seed: int) -> None:
    """Weights of O(1) activations (the trainer's init is too small for a parity test to see a wrong term)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.copy_(1 + 0.2 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(torch.randn(param.shape, generator=gen) / param.shape[1] ** 0.5)
        for moe in model.moe_blocks:
            moe.gate.e_score_correction_bias.copy_(0.1 * torch.randn(moe.gate.e_score_correction_bias.shape,
                                                                     generator=gen))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainableDeepseekV32, torch.Tensor, Path]:
    torch.manual_seed(0)
    model = TrainableDeepseekV32(toy_config(), COMPACT_VOCAB).eval()
    _randomize(model, 1)
    token_ids = torch.randperm(toy_config().vocab_size, generator=torch.Generator().manual_seed(2))[:COMPACT_VOCAB]
    token_ids = token_ids.sort().values
    path = export_checkpoint(model, token_ids, tmp_path_factory.mktemp("demo"))
    return model, token_ids, path


def _full_vocab(compact_logits: torch.Tensor, token_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """The trainer's compact logits (last column: every other token) spread over the real vocabulary."""
    full = compact_logits[..., -1:].expand(*compact_logits.shape[:-1], vocab).clone()
    full[..., token_ids] = compact_logits[..., :-1]
    return full


def _ids(token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    compact = torch.randint(0, COMPACT_VOCAB, (SEQ_LEN,), generator=torch.Generator().manual_seed(3))
    return compact, token_ids[compact]


def test_checkpoint_files_names_and_compressible_rows(exported: tuple[TrainableDeepseekV32, torch.Tensor, Path]
                                                      ) -> None:
    _, token_ids, path = exported
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV32ForCausalLM"] and config["index_topk"] == 16
    assert (path / "tokenizer.json").is_file() and (path / "tokenizer_config.json").is_file()
    with safe_open(str(path / "model.safetensors"), framework="pt") as fh:
        names = set(fh.keys())
        embed, head = fh.get_tensor("model.embed_tokens.weight"), fh.get_tensor("lm_head.weight")
    n = toy_config().num_hidden_layers
    assert {f"model.layers.{n}.eh_proj.weight", f"model.layers.{n}.shared_head.norm.weight",
            "model.layers.1.mlp.experts.7.down_proj.weight", "model.layers.1.mlp.gate.e_score_correction_bias",
            "model.layers.0.self_attn.indexer.weights_proj.weight"} <= names
    unused = torch.ones(embed.shape[0], dtype=torch.bool)
    unused[token_ids] = False
    assert not embed[unused].any()
    assert (head[unused] == head[unused][0]).all()


def test_dsv32_loads_it_with_the_trainers_logits(exported: tuple[TrainableDeepseekV32, torch.Tensor, Path]) -> None:
    model, token_ids, path = exported
    compact, ids = _ids(token_ids)
    ours = load_model(ModelConfig.from_pretrained(str(path)), str(path), dtype="float32", with_mtp=True,
                      progress=False)
    cache = ours.allocate_kv_cache(8, BLOCK, "auto")
    hidden = ours(single_sequence_batch(ids, 0, [2, 0, 5], BLOCK), cache)
    logits = ours.compute_logits(hidden)
    with torch.no_grad():
        trained = model(compact[None], sparse=True)
    vocab = ours.config.vocab_size
    assert (logits - _full_vocab(trained.logits[0], token_ids, vocab)).abs().max().item() <= 1e-4
    # MTP: row i reads the main model's hidden at i and the token at i + 1.
    mtp_hidden = ours.forward_mtp(single_sequence_batch(ids[1:], 0, [2, 0, 5], BLOCK), hidden[:-1], cache)
    mtp_logits = ours.compute_mtp_logits(mtp_hidden)
    assert (mtp_logits - _full_vocab(trained.mtp_logits[0], token_ids, vocab)).abs().max().item() <= 1e-4


def test_sparse_attention_really_prunes(exported: tuple[TrainableDeepseekV32, torch.Tensor, Path]) -> None:
    model, token_ids, _ = exported
    compact, _ = _ids(token_ids)
    with torch.no_grad():
        dense, sparse = model(compact[None], sparse=False), model(compact[None], sparse=True)
    topk = toy_config().index_topk
    assert torch.equal(dense.logits[0, :topk], sparse.logits[0, :topk])  # no more keys than top-k: same
    assert (dense.logits[0, topk:] - sparse.logits[0, topk:]).abs().max().item() > 1e-3


def test_hf_transformers_loads_it_with_the_same_logits(exported: tuple[TrainableDeepseekV32, torch.Tensor, Path]
                                                       ) -> None:
    from transformers import AutoModelForCausalLM

    model, token_ids, path = exported
    compact, ids = _ids(token_ids)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        reference = hf(ids[None]).logits[0].float()
        trained = model(compact[None], sparse=True)
    assert (reference - _full_vocab(trained.logits[0], token_ids, reference.shape[-1])).abs().max().item() <= 1e-4
