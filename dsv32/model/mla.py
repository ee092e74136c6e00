"""Multi-head Latent Attention (MLA), optionally restricted to the indexer's top-k keys (DeepSeek Sparse Attention).

Per token ``x`` (after ``input_layernorm``)::

    qr        = RMSNorm(W_qa x)                               # [q_lora_rank], shared with the indexer
    q_h       = (W_qb qr)_h = [q_nope_h (d_n) ; q_pe_h (d_r)]  # q_pe: interleaved RoPE
    [c ; k_pe] = W_kva x;  c = RMSNorm(c)                      # c: latent [kv_lora_rank]; k_pe: one rope key (MQA)
    cache <- [c ; k_pe]                                        # 576 values per token for the real model
    W_kvb     = per head [W_UK_h (d_n x r) ; W_UV_h (d_v x r)]
    score(t, s) = (q_nope_h . W_UK_h c_s + q_pe_h . k_pe_s) * softmax_scale
    o_h       = sum_s softmax_s(score) * W_UV_h c_s;   out = W_o [o_1 .. o_H]

Two equivalent evaluations, both implemented:

* **non-absorbed** ("MHA mode", used for prefill chunks): expand every cached latent into per-head keys and values
  ``W_kvb c_s`` and attend with 192-wide heads.
* **weight-absorbed** ("MQA mode", used for decode): fold ``W_UK`` into the query (``q_abs = W_UK_h^T q_nope_h``)
  and ``W_UV`` after the attention, so every head attends directly over the 576-wide cached entries
  ``[c ; k_pe]`` with values ``c``: no per-token expansion of the context.

Sparse attention: keys the indexer did not select (and future keys) are masked before the softmax.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv32.config import ModelConfig
from dsv32.kernels.reference import positions_to_mask
from dsv32.model.batch import AttentionMetadata
from dsv32.model.cache import KVCache
from dsv32.model.indexer import Indexer
from dsv32.model.linear import Linear
from dsv32.model.norm import RMSNorm
from dsv32.model.rope import apply_rope_interleaved


class MLA(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        c = config
        self.n_heads = c.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.kv_lora_rank = c.kv_lora_rank
        self.softmax_scale = c.softmax_scale
        self.q_a_proj = Linear(c.hidden_size, c.q_lora_rank, dtype)
        self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
        self.q_b_proj = Linear(c.q_lora_rank, self.n_heads * c.qk_head_dim, dtype)
        self.kv_a_proj_with_mqa = Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, dtype)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps)
        self.kv_b_proj = Linear(c.kv_lora_rank, self.n_heads * (c.qk_nope_head_dim + c.v_head_dim), dtype)
        self.o_proj = Linear(self.n_heads * c.v_head_dim, c.hidden_size, dtype)
        self.indexer = Indexer(config, dtype) if config.has_indexer else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata,
                cache: KVCache, layer: int) -> torch.Tensor:
        num_tokens = x.shape[0]
        qr = self.q_a_layernorm(self.q_a_proj(x))
        q = self.q_b_proj(qr).view(num_tokens, self.n_heads, -1)
        q_nope, q_pe = q[..., :self.nope_dim], apply_rope_interleaved(q[..., self.nope_dim:], cos, sin)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_pe = apply_rope_interleaved(k_pe, cos, sin)
        cache.write_latent(layer, meta.slot_mapping, self.kv_a_layernorm(latent), k_pe)
        selection = self.indexer(x, qr, cos, sin, meta, cache, layer) if self.indexer is not None else None

        out = x.new_empty(num_tokens, self.n_heads, self.v_dim)
        for b in meta.prefill_seqs:
            span = meta.spans[b]
            selected = selection.prefill[b] if selection is not None else None
            if selected is not None:
                selected = positions_to_mask(selected, span.context_len)
            rows = slice(span.start, span.end)
            out[rows] = self._attend_expanded(q_nope[rows], q_pe[rows], span.positions, span.slots, selected,
                                              cache, layer)
        if meta.decode_seqs:
            allowed = meta.decode_valid
            if selection is not None and selection.decode is not None:
                allowed = allowed & positions_to_mask(selection.decode, allowed.shape[1])
            rows = meta.decode_rows
            out[rows] = self._attend_absorbed(q_nope[rows], q_pe[rows], meta.decode_slots, allowed, cache, layer)
        return self.o_proj(out.flatten(1))

    def _attend_expanded(self, q_nope: torch.Tensor, q_pe: torch.Tensor, positions: torch.Tensor,
                         slots: torch.Tensor, selected: torch.Tensor | None, cache: KVCache,
                         layer: int) -> torch.Tensor:
        """Non-absorbed attention of ``n`` queries over one sequence's ``L`` cached entries -> ``[n, H, d_v]``."""
        latent, k_pe = cache.read_latent(layer, slots)
        kv = self.kv_b_proj(latent).view(latent.shape[0], self.n_heads, -1)
        k_nope, v = kv[..., :self.nope_dim], kv[..., self.nope_dim:]
        scores = (torch.einsum("nhd,lhd->hnl", q_nope, k_nope)
                  + torch.einsum("nhr,lr->hnl", q_pe, k_pe)) * self.softmax_scale
        allowed = torch.arange(latent.shape[0], device=slots.device)[None, :] <= positions[:, None]
        if selected is not None:
            allowed = allowed & selected
        probs = scores.float().masked_fill(~allowed, float("-inf")).softmax(-1).to(v.dtype)
        return torch.einsum("hnl,lhv->nhv", probs, v)

    def _attend_absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, slots: torch.Tensor,
                         allowed: torch.Tensor, cache: KVCache, layer: int) -> torch.Tensor:
        """Weight-absorbed attention of one query per sequence over padded contexts ``[B, L]`` -> ``[B, H, d_v]``."""
        batch, length = slots.shape
        latent, k_pe = cache.read_latent(layer, slots.flatten())
        latent, k_pe = latent.view(batch, length, -1), k_pe.view(batch, length, -1)
        w_kvb = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w_kvb[:, :self.nope_dim], w_kvb[:, self.nope_dim:]
        q_abs = torch.einsum("bhd,hdr->bhr", q_nope, w_uk.to(q_nope.dtype))
        scores = (torch.einsum("bhr,blr->bhl", q_abs, latent)
                  + torch.einsum("bhp,blp->bhl", q_pe, k_pe)) * self.softmax_scale
        probs = scores.float().masked_fill(~allowed[:, None, :], float("-inf")).softmax(-1).to(latent.dtype)
        o_latent = torch.einsum("bhl,blr->bhr", probs, latent)
        return torch.einsum("bhr,hvr->bhv", o_latent, w_uv.to(o_latent.dtype))
