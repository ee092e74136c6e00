"""Fixtures for model tests: tiny random HF checkpoints written by transformers' own DeepseekV3/V32 classes."""

from __future__ import annotations

import json
import os

import pytest
import torch

from dsv32.model.batch import ForwardBatch

VOCAB = 1024


def make_hf_checkpoint(out: str, arch: str, seed: int = 0, kv_lora_rank: int = 32, rope_dim: int = 16,
                       moe_intermediate_size: int = 64) -> str:
    """Mirror ../shared/peers/make_tiny_checkpoint.py with a small vocabulary (parity does not need the tokenizer)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, DeepseekV32Config, DeepseekV32ForCausalLM

    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, moe_intermediate_size=moe_intermediate_size,
        num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1, routed_scaling_factor=2.5,
        norm_topk_prob=True, q_lora_rank=64, kv_lora_rank=kv_lora_rank, qk_nope_head_dim=32,
        qk_rope_head_dim=rope_dim, v_head_dim=32, max_position_embeddings=163840, rms_norm_eps=1e-6,
        initializer_range=0.02, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                         "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
                         "mscale": 1.0, "mscale_all_dim": 1.0},
    )
    if arch == "v3":
        cfg, cls = DeepseekV3Config(**common, num_nextn_predict_layers=0), DeepseekV3ForCausalLM
    else:
        cfg = DeepseekV32Config(**common, index_n_heads=16, index_head_dim=32, index_topk=16)
        cls = DeepseekV32ForCausalLM
    model = cls(cfg)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.1)
    model.save_pretrained(out, safe_serialization=True)
    path = os.path.join(out, "config.json")
    with open(path) as fh:
        config = json.load(fh)
    config.update({"topk_method": "noaux_tc", "scoring_func": "sigmoid", "moe_layer_freq": 1})
    with open(path, "w") as fh:
        json.dump(config, fh)
    return out


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hf")
    return {arch: make_hf_checkpoint(str(root / arch), arch) for arch in ("v3", "v32")}


def single_sequence_batch(ids: torch.Tensor, start: int, block_table: list[int], block_size: int) -> ForwardBatch:
    """Tokens ``ids`` at positions ``start..`` of one sequence whose cache blocks are ``block_table``."""
    return multi_sequence_batch([(ids, start, block_table)], block_size)


def multi_sequence_batch(seqs: list[tuple[torch.Tensor, int, list[int]]], block_size: int) -> ForwardBatch:
    """Several sequences in one flat batch: each entry is (new token ids, start position, block table)."""
    ids, positions, slots, starts, lens = [], [], [], [0], []
    width = max(len(bt) for _, _, bt in seqs)
    tables = torch.zeros(len(seqs), width, dtype=torch.long)
    for b, (tok, start, table) in enumerate(seqs):
        pos = torch.arange(start, start + len(tok))
        tables[b, :len(table)] = torch.tensor(table)
        ids.append(tok)
        positions.append(pos)
        slots.append(tables[b, pos // block_size] * block_size + pos % block_size)
        starts.append(starts[-1] + len(tok))
        lens.append(start + len(tok))
    return ForwardBatch(torch.cat(ids), torch.cat(positions), starts, lens, tables, torch.cat(slots))
