"""The DeepSeek-V3 / V3.2 decoder: embedding -> N x (MLA[+indexer] , MLP|MoE) -> RMSNorm -> LM head, plus MTP.

One decoder layer (pre-norm residual)::

    h = h + MLA(RMSNorm(h))
    h = h + FFN(RMSNorm(h))          # FFN = dense SwiGLU for the first ``first_k_dense_replace`` layers, else MoE

computed as vLLM does, with the residual carried beside each sub-block's output and added by the fused
add+RMSNorm op of the next norm.

The forward runs on a flat varlen ``ForwardBatch`` (no padding) against a paged ``KVCache``; it returns the
final-normed hidden state of every token and leaves the LM head to ``compute_logits`` so the engine only projects
the rows it samples from.

MTP (``num_nextn_predict_layers``; checkpoint layer ``num_hidden_layers + j``): for position i, from the main model's
final hidden ``h_i`` and the embedding of token ``t_{i+1}``::

    x = W_eh [RMSNorm_e(Emb(t_{i+1})) ; RMSNorm_h(h_i)];   x = DecoderLayer(x);   logits = Head(RMSNorm(x))

with the embedding and head shared with the main model (as vLLM/SGLang load it). The MTP layer is a full decoder
layer with its own cache (layer ``num_hidden_layers + j`` of the ``KVCache``, same block tables); drafting more than
one token reruns it with its own output ``x`` in place of ``h_i`` (as vLLM does).

Under tensor/expert parallelism (``parallel``) every layer holds this rank's shard and joins its collectives (see
``dsv32.distributed.parallel``); ``forward`` returns the same full hidden state on every rank and ``compute_logits``
the full logits.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Concatenate, ParamSpec, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from dsv32.config import ModelConfig
from dsv32.distributed.parallel import SINGLE_PROCESS, ParallelContext
from dsv32.kernels import KernelBackend, using_backend
from dsv32.kernels.attention import AttentionMetadata, absorbed_dtype
from dsv32.kernels.cache_format import CacheLayout, normalize_kv_cache_dtype
from dsv32.model.batch import ForwardBatch
from dsv32.model.cache import KVCache
from dsv32.model.graphs import DecodeGraphs
from dsv32.model.linear import Linear
from dsv32.model.mla import MLA
from dsv32.model.moe import MLP, MoE
from dsv32.model.norm import RMSNorm
from dsv32.model.quantize import weight_bytes
from dsv32.model.rope import RopeTables, rope_inv_freq


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, dtype: torch.dtype, moe: bool,
                 parallel: ParallelContext = SINGLE_PROCESS) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config, dtype, parallel)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp: nn.Module = (MoE(config, dtype, parallel) if moe else
                               MLP(config.hidden_size, config.intermediate_size, dtype, parallel))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, rope: RopeTables, meta: AttentionMetadata,
                cache: KVCache, token_counts: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``x``: the previous block's output, ``residual``: the stream before it (None: ``x`` is the stream);
        ``token_counts``: every rank's token count under data-parallel attention (``ForwardBatch.rank_token_counts``).
        Returns this layer's FFN output and the stream before it."""
        x, residual = self.input_layernorm.add_forward(x, residual)
        x = self.self_attn(x, rope, meta, cache, self.layer_idx)
        x, residual = self.post_attention_layernorm.add_forward(x, residual)
        return self.mlp(x, token_counts), residual


class Embedding(nn.Module):
    """Token embedding; vocab-parallel under TP: this rank holds rows ``[start, start + local)`` (zero-padded past the
    vocabulary), looks up the ids that fall there (zeros for the others) and the ranks' lookups are summed."""

    def __init__(self, vocab: int, hidden: int, dtype: torch.dtype,
                 parallel: ParallelContext = SINGLE_PROCESS) -> None:
        super().__init__()
        self.parallel = parallel
        shard = parallel.tp_shard
        self.shard = shard if shard.size > 1 else None
        self.shard_dim = 0
        self.full_shape = (vocab, hidden)
        self.vocab_start = shard.bounds(vocab)[0]
        self.weight = nn.Parameter(torch.empty(shard.local(vocab), hidden, dtype=dtype), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.shard is None:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill_(outside[:, None], 0)
        return self.parallel.all_reduce(out)


class DeepseekModel(nn.Module):
    """``model.*`` of the HF checkpoint: embeddings, decoder layers, final norm."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, parallel: ParallelContext = SINGLE_PROCESS) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype, parallel)
        self.layers = nn.ModuleList(DecoderLayer(config, i, dtype, config.is_moe_layer(i), parallel)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MTPLayer(nn.Module):
    """One multi-token-prediction module (checkpoint prefix ``model.layers.{num_hidden_layers + j}``)."""

    def __init__(self, config: ModelConfig, cache_layer: int, dtype: torch.dtype,
                 parallel: ParallelContext = SINGLE_PROCESS) -> None:
        super().__init__()
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = Linear(2 * config.hidden_size, config.hidden_size, dtype)  # replicated (as vLLM / SGLang)
        self.block = DecoderLayer(config, cache_layer, dtype, config.n_routed_experts > 0, parallel)
        self.shared_head_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


P = ParamSpec("P")
R = TypeVar("R")


def _on_kernels(method: Callable[Concatenate[DeepseekForCausalLM, P], R]
                ) -> Callable[Concatenate[DeepseekForCausalLM, P], R]:
    """Run a model call on the model's own kernel backend, if it was given one (else the process default)."""

    @functools.wraps(method)
    def run(self: DeepseekForCausalLM, *args: P.args, **kwargs: P.kwargs) -> R:
        backend = self.kernel_backend
        with using_backend(backend) if backend is not None else contextlib.nullcontext():
            return method(self, *args, **kwargs)

    return run


class DeepseekForCausalLM(nn.Module):
    """DeepSeek-V3.2 (with indexer) or V3 (dense MLA) for causal LM, on a paged KV cache."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, with_mtp: bool = False,
                 parallel: ParallelContext = SINGLE_PROCESS) -> None:
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.parallel = parallel
        # The kernels this model's calls run on (the engine sets them from its config); None: the process default.
        self.kernel_backend: KernelBackend | None = None
        # Captured decode steps (``dsv32.model.graphs``); None: every step runs eagerly.
        self.decode_graphs: DecodeGraphs | None = None
        self.model = DeepseekModel(config, dtype, parallel)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, dtype, parallel.dense_shard)
        n_mtp = config.num_nextn_predict_layers if with_mtp else 0
        self.mtp = nn.ModuleList(MTPLayer(config, config.num_hidden_layers + j, dtype, parallel)
                                 for j in range(n_mtp))
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    @property
    def num_cache_layers(self) -> int:
        return self.config.num_hidden_layers + len(self.mtp)

    def cache_layout(self, kv_cache_dtype: str) -> CacheLayout:
        c = self.config
        return CacheLayout(c.kv_lora_rank, c.qk_rope_head_dim, c.index_head_dim if c.has_indexer else 0,
                           normalize_kv_cache_dtype(kv_cache_dtype), self.dtype)

    def kv_cache_bytes_per_token(self, kv_cache_dtype: str) -> int:
        return self.cache_layout(kv_cache_dtype).bytes_per_token() * self.num_cache_layers

    def weight_bytes(self) -> int:
        """Bytes of this rank's weights as held (packed INT8 / INT4 codes and their scales included)."""
        return weight_bytes(self)

    def prepare_weights(self) -> None:
        """Derived weights made once after loading (the absorbed MLA weights, norm weights in the compute dtype,
        prepacked linear weights); ``load_model`` calls it."""
        attention = [module for module in self.modules() if isinstance(module, MLA)]
        # the absorbed weights of a layer hold as many elements as its kv_b_proj (H x (d_n + d_v) x r)
        absorbed = absorbed_dtype(self.inv_freq.device, self.dtype,
                                  sum(m.n_heads * (m.nope_dim + m.v_dim) * m.kv_lora_rank for m in attention))
        for module in attention:
            module.prepare_weights(absorbed)
        for module in self.modules():
            if isinstance(module, Linear):
                module.prepare_weights()
            elif isinstance(module, RMSNorm):
                module.prepare_weights(self.dtype)

    def allocate_kv_cache(self, num_blocks: int, block_size: int, kv_cache_dtype: str) -> KVCache:
        return KVCache(self.cache_layout(kv_cache_dtype), self.num_cache_layers, num_blocks, block_size,
                       self.inv_freq.device)

    def rope_tables(self, positions: torch.Tensor) -> RopeTables:
        """The rotations of one step's positions (built once, shared by every layer)."""
        c = self.config
        return RopeTables.build(self.inv_freq, positions, self.dtype, c.index_head_dim if c.has_indexer else 0)

    @_on_kernels
    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_cache: KVCache) -> torch.Tensor:
        """Final-normed hidden states ``[T, hidden]`` of every token in the batch; writes their KV to the cache."""
        if self.decode_graphs is not None:
            hidden = self.decode_graphs.run(batch, kv_cache)
            if hidden is not None:
                return hidden
        local, mine, order = self._split(batch)
        meta = local.attention_metadata(kv_cache.block_size)
        hidden = self._run_layers(local.input_ids, local.positions, meta, kv_cache, local.rank_token_counts)
        return self._join(hidden, batch, local, order)

    @_on_kernels
    @torch.inference_mode()
    def capture_decode_graphs(self, kv_cache: KVCache) -> tuple[int, ...]:
        """Compile the decode graphs of every capture size now (``dsv32.model.graphs``); the sizes captured, none
        when this model runs eagerly."""
        if self.decode_graphs is None:
            return ()
        self.decode_graphs.capture(kv_cache)
        return self.decode_graphs.sizes

    def decode_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                       decode_slots: torch.Tensor, decode_lens: torch.Tensor, kv_cache: KVCache) -> torch.Tensor:
        """``forward`` of a step of decodes only, given as tensors (``AttentionMetadata.for_decodes``): the function
        ``dsv32.model.graphs`` captures."""
        meta = AttentionMetadata.for_decodes(slot_mapping, decode_slots, decode_lens)
        return self._run_layers(input_ids, positions, meta, kv_cache)

    def _run_layers(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                    kv_cache: KVCache, token_counts: list[int] | None = None) -> torch.Tensor:
        rope = self.rope_tables(positions)
        x, residual = self.model.embed_tokens(input_ids), None
        for layer in self.model.layers:
            x, residual = layer(x, residual, rope, meta, kv_cache, token_counts)
        return self.model.norm.add_forward(x, residual)[0]

    def _split(self, batch: ForwardBatch) -> tuple[ForwardBatch, torch.Tensor | None, torch.Tensor | None]:
        """Data-parallel attention: this rank's part of the batch, its token rows, and every rank's rows in rank
        order (the part carries each rank's token count, for the MoE). Otherwise the whole batch."""
        if not self.parallel.data_parallel:
            return batch, None, None
        rows = batch.rank_rows(self.parallel.world_size)
        device = batch.input_ids.device
        mine = torch.tensor(rows[self.parallel.rank], dtype=torch.long, device=device)
        order = torch.tensor([t for rank_rows in rows for t in rank_rows], dtype=torch.long, device=device)
        return batch.for_rank(self.parallel.rank, rows), mine, order

    def _join(self, hidden: torch.Tensor, batch: ForwardBatch, local: ForwardBatch,
              order: torch.Tensor | None) -> torch.Tensor:
        """Every token's hidden state in batch order, on every rank (data-parallel attention: gathered)."""
        if order is None:
            return hidden
        out = hidden.new_empty((batch.num_tokens, hidden.shape[1]))
        out[order] = self.parallel.gather_tokens(hidden, local.rank_token_counts)
        return out

    @_on_kernels
    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits ``[rows, vocab]`` (vocab-parallel: each rank's slice, gathered)."""
        local = self.decode_graphs.logits(hidden) if self.decode_graphs is not None else None
        logits = self.parallel.all_gather(self.local_logits(hidden) if local is None else local)
        return logits[:, :self.config.vocab_size] if logits.shape[1] != self.config.vocab_size else logits

    def local_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's fp32 logits ``[rows, vocab / ranks]``: the LM head's product in the compute dtype, widened."""
        return self.lm_head(hidden).float()

    @_on_kernels
    @torch.inference_mode()
    def forward_mtp(self, batch: ForwardBatch, previous_hidden: torch.Tensor, kv_cache: KVCache,
                    depth: int = 0) -> torch.Tensor:
        """MTP module ``depth``: ``batch.input_ids`` hold the *next* tokens ``t_{i+1}`` at positions ``i``, and
        ``previous_hidden`` the main model's final hidden ``h_i`` (or this layer's own output one position back).
        Writes the layer's cache at those positions; returns its hidden states (before the shared head's norm:
        ``compute_mtp_logits`` applies it)."""
        mtp = self.mtp[depth]
        local, mine, order = self._split(batch)
        if mine is not None:
            previous_hidden = previous_hidden[mine]
        meta = local.attention_metadata(kv_cache.block_size)
        rope = self.rope_tables(local.positions)
        e = mtp.enorm(self.model.embed_tokens(local.input_ids))
        x = mtp.eh_proj(torch.cat((e, mtp.hnorm(previous_hidden.to(self.dtype))), dim=-1))
        x, residual = mtp.block(x, None, rope, meta, kv_cache, local.rank_token_counts)
        return self._join(x + residual, batch, local, order)

    @_on_kernels
    @torch.inference_mode()
    def compute_mtp_logits(self, hidden: torch.Tensor, depth: int = 0) -> torch.Tensor:
        return self.compute_logits(self.mtp[depth].shared_head_norm(hidden))
