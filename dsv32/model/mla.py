"""Multi-head Latent Attention (MLA), optionally restricted to the indexer's top-k keys (DeepSeek Sparse Attention).

Per token ``x`` (after ``input_layernorm``)::

    qr        = RMSNorm(W_qa x)                               # [q_lora_rank], shared with the indexer
    q_h       = (W_qb qr)_h = [q_nope_h (d_n) ; q_pe_h (d_r)]  # q_pe: interleaved RoPE
    [c ; k_pe] = W_kva x;  c = RMSNorm(c)                      # c: latent [kv_lora_rank]; k_pe: one rope key (MQA)
    cache <- [c ; k_pe]                                        # 576 values per token for the real model
    W_kvb     = per head [W_UK_h (d_n x r) ; W_UV_h (d_v x r)]
    score(t, s) = (q_nope_h . W_UK_h c_s + q_pe_h . k_pe_s) * softmax_scale
    o_h       = sum_s softmax_s(score) * W_UV_h c_s;   out = W_o [o_1 .. o_H]

Two equivalent evaluations, both in ``dsv32.kernels`` (``mla_prefill`` / ``mla_decode``, dispatched by
``dsv32.kernels.attention``):

* **non-absorbed** ("MHA mode", used for prefill chunks): expand every cached latent into per-head keys and values
  ``W_kvb c_s`` and attend with 192-wide heads.
* **weight-absorbed** ("MQA mode", used for decode): fold ``W_UK`` into the query (``q_abs = W_UK_h^T q_nope_h``)
  and ``W_UV`` after the attention, so every head attends directly over the 576-wide cached entries
  ``[c ; k_pe]`` with values ``c``: no per-token expansion of the context. The Triton backend (CUDA) uses this
  form for prefill too, as DeepSeek's sparse kernels do.

Sparse attention: keys the indexer did not select (and future keys) are masked before the softmax.

Tensor parallelism: each rank owns ``H / tp`` heads (``q_b_proj`` / ``kv_b_proj`` column-parallel by head,
``o_proj`` row-parallel, all-reduced); the latent projections, the indexer and the cache writes are replicated.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv32.config import ModelConfig
from dsv32.distributed.parallel import SINGLE_PROCESS, ParallelContext
from dsv32.kernels.attention import AttentionMetadata, MLAWeights, mla_attention
from dsv32.model.cache import KVCache
from dsv32.model.indexer import Indexer
from dsv32.model.linear import Linear
from dsv32.model.norm import RMSNorm
from dsv32.model.rope import RopeTables


class MLA(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, parallel: ParallelContext = SINGLE_PROCESS) -> None:
        super().__init__()
        c = config
        self.parallel = parallel
        self.n_heads = c.num_attention_heads // parallel.tp_size  # this rank's heads
        self.nope_dim, self.rope_dim, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.kv_lora_rank = c.kv_lora_rank
        self.softmax_scale = c.softmax_scale
        self.q_a_proj = Linear(c.hidden_size, c.q_lora_rank, dtype)
        self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
        shard = parallel.tp_shard
        self.q_b_proj = Linear(c.q_lora_rank, c.num_attention_heads * c.qk_head_dim, dtype, shard)
        self.kv_a_proj_with_mqa = Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, dtype)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps)
        self.kv_b_proj = Linear(c.kv_lora_rank, c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim), dtype,
                                shard)
        self.o_proj = Linear(c.num_attention_heads * c.v_head_dim, c.hidden_size, dtype, shard, shard_dim=1)
        self.indexer = Indexer(config, dtype) if config.has_indexer else None
        self.mla_weights: MLAWeights | None = None

    def prepare_weights(self, absorbed: torch.dtype | None = None) -> None:
        """``kv_b_proj`` in the compute dtype and its absorbed parts (in ``absorbed``, default the compute dtype),
        made once after loading (the model's ``prepare_weights`` calls it; call it again after changing
        ``kv_b_proj``)."""
        self.mla_weights = MLAWeights.from_kv_b(self.kv_b_proj.dequantized_weight(), self.n_heads, self.nope_dim,
                                                absorbed)

    def forward(self, x: torch.Tensor, rope: RopeTables, meta: AttentionMetadata, cache: KVCache,
                layer: int) -> torch.Tensor:
        num_tokens = x.shape[0]
        qr = self.q_a_layernorm(self.q_a_proj(x))
        q = self.q_b_proj(qr).view(num_tokens, self.n_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q[..., :self.nope_dim], rope.mla(q[..., self.nope_dim:])
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_pe = rope.mla(k_pe)
        cache.write_latent(layer, meta.slot_mapping, self.kv_a_layernorm(latent), k_pe)
        selection = self.indexer(x, qr, rope, meta, cache, layer) if self.indexer is not None else None

        if self.mla_weights is None:
            self.prepare_weights()
        out = mla_attention(q_nope, q_pe, self.mla_weights, cache.latent[layer], cache.layout, meta, selection,
                            self.softmax_scale)
        return self.parallel.all_reduce(self.o_proj(out.flatten(1)))
