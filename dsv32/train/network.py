"""A trainable DeepSeek-V3.2 in plain PyTorch: the math of ``dsv32.model`` on padded ``[B, L]`` batches, with autograd.

The inference model (``dsv32.model``) runs on a paged cache under ``inference_mode``; this one computes every
sequence from scratch, so gradients flow. Parameter names are the HF checkpoint's (``model.layers.{i}.self_attn.
q_a_proj.weight``, ``mlp.experts.{e}.gate_proj.weight``, the MTP layer as ``model.layers.{num_hidden_layers}``), so
``dsv32.train.export`` writes them as they are. The math is the same (MLA with interleaved RoPE on its rope dims,
the lightning indexer with half-split RoPE and ReLU-then-weight scores, sigmoid group-limited routing with the
``noaux_tc`` selection bias, MTP as ``eh_proj([enorm(emb(t+1)); hnorm(h)])`` through one decoder layer); the rotary
tables and the router are ``dsv32.model``'s own functions.

The vocabulary is compact: ``vocab`` rows for the token ids the corpus uses (``compact id -> token id`` is kept by
the trainer), and the LM head has one more row, shared by every other token of the real vocabulary (trained as a
class that is never the target, so those tokens score low). ``dsv32.train.export`` expands both to the full 129,280.

DeepSeek Sparse Attention in training (the V3.2 report's two stages): every attention layer returns, besides its
output, the indexer's KL loss against the main attention's distribution (summed over heads, L1-normalised,
detached). The indexer reads detached inputs, so the KL trains only the indexer and the LM loss only the rest. With
``sparse`` each query attends only to its indexer top-k keys (``index_topk``; all causal keys while there are no
more) and the KL is taken over that selection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsv32.config import ModelConfig
from dsv32.model.moe import route
from dsv32.model.rope import RopeTables, Rotary, rope_inv_freq


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In fp32 (as the inference model), also when autocast hands in bf16 activations.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight, self.eps).to(x.dtype)


def _linear(fan_in: int, fan_out: int) -> nn.Linear:
    layer = nn.Linear(fan_in, fan_out, bias=False)
    nn.init.normal_(layer.weight, std=0.02)
    return layer


def _rotate(rotary: Rotary, x: torch.Tensor) -> torch.Tensor:
    """``Rotary`` rotates ``[T, ...]``; our activations are ``[B, T, ...]``."""
    return rotary(x.transpose(0, 1)).transpose(0, 1)


@dataclass
class AttentionOutput:
    out: torch.Tensor
    indexer_kl: torch.Tensor  # mean over (batch, query) rows of KL(main attention || indexer distribution)


class Indexer(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.topk = c.index_n_heads, c.index_head_dim, c.index_topk
        self.wq_b = _linear(c.q_lora_rank, c.index_n_heads * c.index_head_dim)
        self.wk = _linear(c.hidden_size, c.index_head_dim)
        self.k_norm = nn.LayerNorm(c.index_head_dim, eps=1e-6)
        self.weights_proj = _linear(c.hidden_size, c.index_n_heads)

    def forward(self, x: torch.Tensor, qr: torch.Tensor, rope: RopeTables) -> torch.Tensor:
        """Index scores ``[B, L, L]`` (``-inf`` above the diagonal): ``sum_h w_h ReLU(q_h . k * D^-0.5)``."""
        batch, length, _ = x.shape
        q = _rotate(rope.indexer, self.wq_b(qr).view(batch, length, self.n_heads, self.head_dim))
        k = _rotate(rope.indexer, self.k_norm(self.wk(x)))
        weights = self.weights_proj(x) * self.n_heads**-0.5
        scores = torch.einsum("bthd,bsd->bths", q * self.head_dim**-0.5, k).relu()  # scaled on the small side
        scores = torch.einsum("bths,bth->bts", scores, weights)
        return scores.masked_fill(_future(length, x.device), float("-inf"))


def _future(length: int, device: torch.device) -> torch.Tensor:
    return torch.ones(length, length, dtype=torch.bool, device=device).triu(1)


class MLA(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.nope, self.rope_dim, self.v_dim = (c.num_attention_heads, c.qk_nope_head_dim,
                                                              c.qk_rope_head_dim, c.v_head_dim)
        self.kv_lora_rank, self.scale = c.kv_lora_rank, c.softmax_scale
        self.q_a_proj = _linear(c.hidden_size, c.q_lora_rank)
        self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
        self.q_b_proj = _linear(c.q_lora_rank, c.num_attention_heads * c.qk_head_dim)
        self.kv_a_proj_with_mqa = _linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps)
        self.kv_b_proj = _linear(c.kv_lora_rank, c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim))
        self.o_proj = _linear(c.num_attention_heads * c.v_head_dim, c.hidden_size)
        self.indexer = Indexer(c)

    def attention_logits(self, x: torch.Tensor, rope: RopeTables) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The main attention's scaled scores ``[B, H, L, L]`` (no mask applied), the indexer's scores ``[B, L, L]``
        (``-inf`` above the diagonal) and the values ``[B, L, H, v_dim]``."""
        batch, length, _ = x.shape
        qr = self.q_a_layernorm(self.q_a_proj(x))
        q = self.q_b_proj(qr).view(batch, length, self.n_heads, self.nope + self.rope_dim)
        q_nope, q_pe = q[..., :self.nope], _rotate(rope.mla, q[..., self.nope:])
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent)).view(batch, length, self.n_heads, self.nope + self.v_dim)
        k_nope, v = kv[..., :self.nope], kv[..., self.nope:]
        k_pe = _rotate(rope.mla, k_pe)
        # The softmax scale is applied to the queries, not to the [B, H, L, L] scores (one pass fewer each way).
        scores = (torch.einsum("bthd,bshd->bhts", q_nope * self.scale, k_nope)
                  + torch.einsum("bthd,bsd->bhts", q_pe * self.scale, k_pe))
        return scores, self.indexer(x.detach(), qr.detach(), rope), v

    def forward(self, x: torch.Tensor, rope: RopeTables, sparse: bool) -> AttentionOutput:
        scores, index_scores, v = self.attention_logits(x, rope)
        length = x.shape[1]
        hidden_keys = _future(length, x.device)  # [L, L], or [B, L, L] once the indexer prunes
        if sparse and length > self.indexer.topk:
            chosen = index_scores.detach().topk(self.indexer.topk, dim=-1).indices
            # Rows with fewer causal keys than top-k also pick future (-inf) keys; the causal mask removes them.
            hidden_keys = hidden_keys | torch.ones_like(index_scores, dtype=torch.bool).scatter_(-1, chosen, False)
        head_mask = hidden_keys[:, None] if hidden_keys.dim() == 3 else hidden_keys
        probs = scores.masked_fill(head_mask, float("-inf")).softmax(dim=-1)
        out = self.o_proj(torch.einsum("bhts,bshd->bthd", probs, v).flatten(2))
        # The KL in fp32 whatever the matmul precision (bf16 rounding would make it slightly negative).
        target = probs.detach().float().sum(1)
        target = target / target.sum(-1, keepdim=True)
        log_q = index_scores.float().masked_fill(hidden_keys, float("-inf"))
        log_q = log_q.log_softmax(dim=-1)
        kl = (target * (target.clamp_min(1e-12).log() - log_q.clamp_min(-1e4))).sum(-1)
        return AttentionOutput(out, kl.mean())


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = (_linear(hidden, inter), _linear(hidden, inter),
                                                        _linear(inter, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c.n_routed_experts, c.hidden_size) * 0.02)
        # Not trained by gradients: nudged after every step towards balanced expert load (``update_bias``).
        self.register_buffer("e_score_correction_bias", torch.zeros(c.n_routed_experts))


class MoE(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.config = c
        self.gate = Gate(c)
        self.experts = nn.ModuleList(MLP(c.hidden_size, c.moe_intermediate_size) for _ in range(c.n_routed_experts))
        self.shared_experts = MLP(c.hidden_size, c.moe_intermediate_size * c.n_shared_experts)
        self.register_buffer("load", torch.zeros(c.n_routed_experts), persistent=False)  # tokens per expert, summed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        flat = x.reshape(-1, x.shape[-1])
        weights, ids = route(F.linear(flat, self.gate.weight), self.gate.e_score_correction_bias, c.n_group,
                             c.topk_group, c.num_experts_per_tok, c.norm_topk_prob, c.routed_scaling_factor)
        # Each expert runs on the rows routed to it; their weighted outputs are summed into place in one go.
        order = ids.flatten().argsort(stable=True)
        counts = torch.bincount(ids.flatten(), minlength=c.n_routed_experts)
        rows = order // c.num_experts_per_tok
        routed = []
        for expert, expert_rows in zip(self.experts, rows.split(counts.tolist()), strict=True):
            if expert_rows.numel():
                routed.append(expert(flat[expert_rows]))
        scaled = torch.cat(routed) * weights.flatten()[order, None]
        out = self.shared_experts(flat).index_add(0, rows, scaled)
        with torch.no_grad():
            self.load += counts.float()
        return out.view_as(x)

    @torch.no_grad()
    def update_bias(self, rate: float) -> None:
        """DeepSeek-V3's auxiliary-loss-free balancing: raise the bias of under-loaded experts, lower the
        over-loaded ones', by ``rate`` (then start counting anew)."""
        self.gate.e_score_correction_bias += rate * torch.sign(self.load.mean() - self.load)
        self.load.zero_()


class DecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig, moe: bool) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = MLA(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MoE(c) if moe else MLP(c.hidden_size, c.intermediate_size)

    def forward(self, x: torch.Tensor, rope: RopeTables, sparse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        attention = self.self_attn(self.input_layernorm(x), rope, sparse)
        x = x + attention.out
        return x + self.mlp(self.post_attention_layernorm(x)), attention.indexer_kl


class MTPLayer(DecoderLayer):
    """Checkpoint layer ``num_hidden_layers``: a decoder layer plus the MTP projections and the head's norm."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__(c, moe=c.n_routed_experts > 0)
        self.enorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.hnorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.eh_proj = _linear(2 * c.hidden_size, c.hidden_size)
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class Model(nn.Module):
    """``model.*``: embeddings (compact vocabulary), the decoder layers then the MTP layer, the final norm."""

    def __init__(self, c: ModelConfig, vocab: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, c.hidden_size)
        nn.init.normal_(self.embed_tokens.weight, std=0.02)
        layers: list[nn.Module] = [DecoderLayer(c, c.is_moe_layer(i)) for i in range(c.num_hidden_layers)]
        layers += [MTPLayer(c) for _ in range(c.num_nextn_predict_layers)]
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


@dataclass
class Outputs:
    logits: torch.Tensor  # [B, L, vocab + 1]: next token
    mtp_logits: torch.Tensor | None  # [B, L - 1, vocab + 1]: the token after next, from position i's MTP row
    indexer_kl: torch.Tensor  # summed over the attention layers (the MTP layer's included)


class TrainableDeepseekV32(nn.Module):
    """DeepSeek-V3.2 for causal LM with a compact vocabulary of ``vocab`` tokens (+1 shared head row)."""

    def __init__(self, config: ModelConfig, vocab: int) -> None:
        super().__init__()
        if not config.has_indexer:
            raise ValueError("the demo trainer builds DeepSeek-V3.2 (index_topk > 0)")
        self.config = config
        self.model = Model(config, vocab)
        self.lm_head = _linear(config.hidden_size, vocab + 1)
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    @property
    def moe_blocks(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def forward(self, ids: torch.Tensor, sparse: bool = False, with_mtp: bool = True) -> Outputs:
        c = self.config
        positions = torch.arange(ids.shape[1], device=ids.device)
        rope = RopeTables.build(self.inv_freq, positions, torch.float32, c.index_head_dim)
        x = self.model.embed_tokens(ids)
        kl = x.new_zeros(())
        for layer in self.model.layers[:c.num_hidden_layers]:
            x, layer_kl = layer(x, rope, sparse)
            kl = kl + layer_kl
        hidden = self.model.norm(x)
        logits = self.lm_head(hidden)
        mtp_logits = None
        if with_mtp and c.num_nextn_predict_layers:
            mtp: MTPLayer = self.model.layers[c.num_hidden_layers]
            short = RopeTables.build(self.inv_freq, positions[:-1], torch.float32, c.index_head_dim)
            e = mtp.enorm(self.model.embed_tokens(ids[:, 1:]))
            y = mtp.eh_proj(torch.cat((e, mtp.hnorm(hidden[:, :-1])), dim=-1))
            y, layer_kl = mtp(y, short, sparse)
            kl = kl + layer_kl
            mtp_logits = self.lm_head(mtp.shared_head.norm(y))
        return Outputs(logits, mtp_logits, kl)
