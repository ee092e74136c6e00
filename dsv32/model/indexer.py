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

from dataclasses import dataclass, field

import torch
from torch import nn

from dsv32.config import ModelConfig
from dsv32.kernels import get_backend
from dsv32.model.batch import AttentionMetadata
from dsv32.model.cache import KVCache
from dsv32.model.linear import Linear
from dsv32.model.norm import LayerNorm
from dsv32.model.rope import apply_rope_half_split


@dataclass
class IndexSelection:
    """The context positions each query may attend (``-1`` padded); ``None`` means every causal key (context <=
    index_topk)."""

    prefill: dict[int, torch.Tensor | None] = field(default_factory=dict)  # seq -> [n, k]
    decode: torch.Tensor | None = None  # [B_d, k]


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

    def _rope(self, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        r = self.rope_dim
        return torch.cat((apply_rope_half_split(t[..., :r], cos, sin), t[..., r:]), dim=-1)

    def forward(self, x: torch.Tensor, qr: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                meta: AttentionMetadata, cache: KVCache, layer: int) -> IndexSelection:
        k = self._rope(self.k_norm(self.wk(x)), cos, sin)
        cache.write_index_k(layer, meta.slot_mapping, k)
        selection = IndexSelection()
        long_prefill = [b for b in meta.prefill_seqs if meta.spans[b].context_len > self.topk]
        long_decode = any(meta.spans[b].context_len > self.topk for b in meta.decode_seqs)
        for b in meta.prefill_seqs:
            selection.prefill[b] = None
        if not long_prefill and not long_decode:
            return selection
        q = self._rope(self.wq_b(qr).view(-1, self.n_heads, self.head_dim), cos, sin)
        weights = self.weights_proj(x.float()) * self.n_heads**-0.5  # [T, H_I]
        backend = get_backend(x.device)
        keys = cache.index_k[layer]
        for b in long_prefill:
            span = meta.spans[b]
            rows = slice(span.start, span.end)
            selection.prefill[b] = backend.indexer_topk(q[rows][None], weights[rows][None], keys, cache.layout,
                                                        span.slots[None], (span.positions + 1)[None], self.topk)[0]
        if long_decode:
            rows = meta.decode_rows
            context_lens = meta.decode_valid.sum(-1)
            selection.decode = backend.indexer_topk(q[rows][:, None], weights[rows][:, None], keys, cache.layout,
                                                    meta.decode_slots, context_lens[:, None], self.topk)[:, 0]
        return selection
