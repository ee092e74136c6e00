"""The lightning indexer of DeepSeek Sparse Attention: picks, per query, the ``index_topk`` past tokens to attend.

Per token (``x``: the attention input, ``qr``: the MLA q-latent after ``q_a_layernorm``)::

    q_h   = (W_qb qr)_h, h < H_I            k = LayerNorm(W_k x)         # single head, shared by all q heads
    q_h, k: half-split (NeoX) RoPE on their FIRST rope_dim dims (MLA puts rope last and interleaved)
    w_h   = (W_w x)_h * H_I^-0.5            # fp32, signed
    I(t, s) = sum_h w_h(t) * ReLU(q_h(t) . k(s) * D^-0.5)       # ReLU before the (signed) head weight
    selected(t) = topk_s I(t, s) over causal s <= t

With the ``fp8`` cache, q and k are Hadamard-rotated and rounded to e4m3 with a per-row scale first, as DeepSeek's
kernels do (the rotation is orthonormal: without rounding it changes nothing). When a sequence's context is no longer
than ``index_topk`` every causal key is selected and no scores are computed.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv32.config import ModelConfig
from dsv32.kernels.attention import AttentionMetadata, IndexSelection, indexer_select
from dsv32.model.cache import KVCache
from dsv32.model.linear import Linear
from dsv32.model.norm import LayerNorm
from dsv32.model.rope import RopeTables


class Indexer(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.n_heads = config.index_n_heads
        self.head_dim = config.index_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.topk = config.index_topk
        self.wq_b = Linear(config.q_lora_rank, self.n_heads * self.head_dim, dtype)
        self.wk = Linear(config.hidden_size, self.head_dim, dtype)
        self.k_norm = LayerNorm(self.head_dim)
        self.weights_proj = Linear(config.hidden_size, self.n_heads, torch.float32)  # kept in fp32, as upstream

    def forward(self, x: torch.Tensor, qr: torch.Tensor, rope: RopeTables, meta: AttentionMetadata, cache: KVCache,
                layer: int) -> IndexSelection:
        k = rope.indexer(self.k_norm(self.wk(x)))
        cache.write_index_k(layer, meta.slot_mapping, k)
        if not any(span.context_len > self.topk for span in meta.prefills) and meta.max_decode_len <= self.topk:
            return IndexSelection([None] * len(meta.prefills))
        q = rope.indexer(self.wq_b(qr).view(-1, self.n_heads, self.head_dim))
        weights = self.weights_proj(x) * self.n_heads**-0.5  # [T, H_I] fp32
        return indexer_select(q, weights, cache.index_k[layer], cache.layout, meta, self.topk)
