"""Benchmark one DeepSeek-V3.2 decoder layer at the real dimensions on one CUDA GPU, against HF transformers.

The layer is ``dsv32.model.deepseek.DecoderLayer`` with the real config (hidden 7168, 128 heads, q/kv ranks 1536/512,
indexer 64x128 top-2048, 256 experts top-8 + 1 shared, FP8 routed experts with 128x128 block scales, random values),
on a paged FP8 KV cache (656 + 132 bytes per token). It runs through ``dsv32.kernels`` (the Triton backend on
CUDA). Cases, all in one run:

* decode: batch 1, 8, 64, 128 at contexts 4K and 32K (one new token per sequence over a filled cache);
* prefill: 4K and 16K tokens of one sequence from position 0.

For each: time per layer (CUDA events, eager; ``--cuda-graph`` also replays decode steps from a CUDA graph), the
bytes a step must move (weights actually touched: all non-expert weights + the distinct routed experts of that step,
plus the KV-cache bytes read: indexer keys of the whole context, latent entries of the top-2048) and the FLOPs it
must do (absorbed MLA, indexer, GEMMs), as achieved GB/s and TFLOP/s and as fractions of the device's peak. HF
transformers' ``DeepseekV32DecoderLayer`` (bf16, SDPA, DynamicCache holding the same context) runs the same cases
where its memory needs fit (it expands the whole context per head every step) and the speed-up and the largest
output difference are shown. ``--e2e-layers N`` adds ``LLM.generate`` over a model of N real-size layers.

    python benchmarks/gpu_layer.py [--batches 1,8,64,128] [--contexts 4096,32768] [--prefill 4096,16384]
                                   [--no-hf] [--cuda-graph] [--e2e-layers 2] [--json results.json]

Without a CUDA device it prints one line and exits with status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from dsv32.config import ModelConfig
from dsv32.kernels import get_backend
from dsv32.kernels.cache_format import CacheLayout
from dsv32.kernels.fp8 import dequantize_block_fp8, quantize_block_fp8
from dsv32.model.batch import ForwardBatch
from dsv32.model.cache import KVCache
from dsv32.model.deepseek import DecoderLayer
from dsv32.model.rope import RopeTables, rope_inv_freq

if TYPE_CHECKING:
    from transformers import DeepseekV32Config

BLOCK_SIZE = 64
FP8_BLOCK = 128
# name fragment -> (HBM bytes/s, dense bf16 FLOP/s); first match wins, so specific names come first
DEVICE_PEAKS = (
    ("H100 PCIe", 2.0e12, 756e12),
    ("H100 NVL", 3.9e12, 835e12),
    ("H200", 4.8e12, 989e12),
    ("H100", 3.35e12, 989e12),
    ("H800", 3.35e12, 989e12),
    ("H20", 4.0e12, 148e12),
    ("B200", 8.0e12, 2250e12),
    ("A100", 2.0e12, 312e12),
)


# ---- the layer ----------------------------------------------------------------------------------------------------


def real_config() -> ModelConfig:
    """DeepSeek-V3.2's own dimensions (``ModelConfig``'s defaults)."""
    return ModelConfig()


def build_layer(config: ModelConfig, device: torch.device, dtype: torch.dtype, fp8_experts: bool,
                seed: int = 0) -> DecoderLayer:
    """A MoE decoder layer (cache layer 0) with random weights: N(0, 0.02) matrices, unit norms, a small router bias;
    routed experts generated one at a time and, with ``fp8_experts``, kept in e4m3 with 128x128 block scales."""
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.device(device):
        layer = DecoderLayer(config, 0, dtype, moe=True)
    experts = layer.mlp.experts
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if name.startswith("mlp.experts."):
                continue
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith("norm.bias"):
                param.zero_()
            elif name.endswith("e_score_correction_bias"):
                param.copy_(torch.randn(param.shape, generator=gen, device=device) * 0.1)
            else:
                param.copy_(torch.randn(param.shape, generator=gen, device=device, dtype=param.dtype) * 0.02)
        for attr in ("gate_up_proj", "down_proj"):
            weight = getattr(experts, attr)
            if not fp8_experts:
                for e in range(weight.shape[0]):
                    weight[e].copy_(torch.randn(weight.shape[1:], generator=gen, device=device, dtype=dtype) * 0.02)
                continue
            rows, cols = weight.shape[1:]
            q = torch.empty(weight.shape, dtype=torch.float8_e4m3fn, device=device)
            scales = torch.empty(weight.shape[0], -(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK), device=device)
            for e in range(weight.shape[0]):
                q[e], scales[e] = quantize_block_fp8(
                    torch.randn(rows, cols, generator=gen, device=device, dtype=dtype) * 0.02)
            setattr(experts, attr, nn.Parameter(q, requires_grad=False))
            setattr(experts, f"{attr}_scale_inv", scales)
    return layer.eval()


def hf_config(config: ModelConfig) -> DeepseekV32Config:
    """The same layer for HF transformers (one layer, MoE, SDPA attention)."""
    from transformers import DeepseekV32Config

    yarn = config.rope_scaling
    cfg = DeepseekV32Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        moe_intermediate_size=config.moe_intermediate_size, num_hidden_layers=1, first_k_dense_replace=0,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_attention_heads,
        n_routed_experts=config.n_routed_experts, num_experts_per_tok=config.num_experts_per_tok,
        n_shared_experts=config.n_shared_experts, n_group=config.n_group, topk_group=config.topk_group,
        routed_scaling_factor=config.routed_scaling_factor, norm_topk_prob=config.norm_topk_prob,
        q_lora_rank=config.q_lora_rank, kv_lora_rank=config.kv_lora_rank, qk_nope_head_dim=config.qk_nope_head_dim,
        qk_rope_head_dim=config.qk_rope_head_dim, v_head_dim=config.v_head_dim,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        index_n_heads=config.index_n_heads, index_head_dim=config.index_head_dim, index_topk=config.index_topk,
        rope_parameters={"rope_type": "yarn", "rope_theta": config.rope_theta, "factor": yarn.factor,
                         "original_max_position_embeddings": yarn.original_max_position_embeddings,
                         "beta_fast": yarn.beta_fast, "beta_slow": yarn.beta_slow, "mscale": yarn.mscale,
                         "mscale_all_dim": yarn.mscale_all_dim},
    )
    cfg._attn_implementation = "sdpa"
    return cfg


def build_hf_layer(config: ModelConfig, ours: DecoderLayer, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """HF's ``DeepseekV32DecoderLayer`` holding our layer's weights (FP8 experts dequantised one at a time), so both
    compute the same function."""
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import DeepseekV32DecoderLayer

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = DeepseekV32DecoderLayer(hf_config(config), 0)
    finally:
        torch.set_default_dtype(default)
    source = dict(ours.named_parameters()) | dict(ours.named_buffers())
    with torch.no_grad():
        for name, target in hf.state_dict().items():
            if name not in source:
                raise KeyError(f"HF tensor {name} has no counterpart in our layer")
            scale = source.get(f"{name}_scale_inv")
            if scale is None:
                target.copy_(source[name])
                continue
            for e in range(target.shape[0]):
                target[e].copy_(dequantize_block_fp8(source[name][e], scale[e], dtype=target.dtype))
    return hf.eval()


# ---- inputs: caches, batches ----------------------------------------------------------------------------------------


@dataclass
class Context:
    """``batch`` sequences of ``length`` cached tokens: our paged cache (sequence b owns a contiguous run of blocks)
    and, optionally, the same entries in an HF ``DynamicCache``."""

    cache: KVCache
    batch: int
    length: int
    hf_cache: object | None = None
    hf_state: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


def allocate_cache(config: ModelConfig, fmt: str, dtype: torch.dtype, tokens: int, device: torch.device) -> KVCache:
    layout = CacheLayout(config.kv_lora_rank, config.qk_rope_head_dim, config.index_head_dim, fmt, dtype)
    return KVCache(layout, 1, -(-tokens // BLOCK_SIZE), BLOCK_SIZE, device)


def fill_context(config: ModelConfig, cache: KVCache, batch: int, length: int, dtype: torch.dtype,
                 with_hf: bool, seed: int = 1, chunk: int = 1 << 16) -> Context:
    """Write random (unit-variance) latents, rope keys and indexer keys for positions ``0 .. length-1`` of each
    sequence, in chunks; mirror them into an HF cache when ``with_hf``."""
    device = cache.latent[0].device
    gen = torch.Generator(device=device).manual_seed(seed)
    blocks_per_seq = -(-(length + 1) // BLOCK_SIZE)  # room for the decode token
    hf_parts: list[list[torch.Tensor]] = [[], [], []]
    widths = (config.kv_lora_rank, config.qk_rope_head_dim, config.index_head_dim)
    for b in range(batch):
        for start in range(0, length, chunk):
            n = min(chunk, length - start)
            c, k_pe, k_index = (torch.randn(n, w, generator=gen, device=device).to(dtype) for w in widths)
            slots = b * blocks_per_seq * BLOCK_SIZE + torch.arange(start, start + n, device=device)
            cache.write_latent(0, slots, c, k_pe)
            cache.write_index_k(0, slots, k_index)
            if with_hf:
                for part, t in zip(hf_parts, (c, k_pe, k_index), strict=True):
                    part.append(t)
    context = Context(cache, batch, length)
    if with_hf:
        from transformers import DynamicCache

        c, k_pe, k_index = (torch.cat(p).view(batch, length, -1) for p in hf_parts)
        # HF's MLA RoPE returns the rotated pairs de-interleaved ([even ; odd]); its cache holds k_pe in that order
        k_pe = torch.cat((k_pe[..., 0::2], k_pe[..., 1::2]), dim=-1)
        hf_cache = DynamicCache(config=hf_config(config))
        hf_cache.update(c[:, None], k_pe[:, None], 0)
        hf_cache.update_indexer(k_index, 0)
        layer = hf_cache.layers[0]
        context.hf_cache, context.hf_state = hf_cache, (layer.keys, layer.values, layer.indexer_keys)
    return context


def decode_batch(context: Context, device: torch.device) -> ForwardBatch:
    """One new token per sequence, at position ``length`` (the cache holds positions ``0 .. length-1``)."""
    batch, length = context.batch, context.length
    blocks_per_seq = -(-(length + 1) // BLOCK_SIZE)
    tables = torch.arange(batch * blocks_per_seq, device=device).view(batch, blocks_per_seq)
    positions = torch.full((batch,), length, dtype=torch.long, device=device)
    slots = tables[:, length // BLOCK_SIZE] * BLOCK_SIZE + length % BLOCK_SIZE
    return ForwardBatch(torch.zeros(batch, dtype=torch.long, device=device), positions, list(range(batch + 1)),
                        [length + 1] * batch, tables, slots)


def prefill_batch(num_tokens: int, device: torch.device) -> ForwardBatch:
    """One sequence of ``num_tokens`` prompt tokens from position 0 (blocks 0, 1, ... in order)."""
    positions = torch.arange(num_tokens, device=device)
    tables = torch.arange(-(-num_tokens // BLOCK_SIZE), device=device)[None]
    return ForwardBatch(torch.zeros(num_tokens, dtype=torch.long, device=device), positions, [0, num_tokens],
                        [num_tokens], tables, positions.clone())


# ---- work accounting --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Work:
    bytes: float
    flops: float


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def weight_bytes(layer: DecoderLayer) -> tuple[int, int]:
    """``(bytes of every non-routed-expert weight, bytes of one routed expert incl. its scales)``."""
    experts = layer.mlp.experts
    dense = sum(_nbytes(p) for n, p in layer.named_parameters() if not n.startswith("mlp.experts."))
    per_expert = sum(_nbytes(t) for t in (experts.gate_up_proj, experts.down_proj, experts.gate_up_proj_scale_inv,
                                          experts.down_proj_scale_inv)) // experts.gate_up_proj.shape[0]
    return dense, per_expert


def linear_flops_per_token(config: ModelConfig) -> float:
    """2 x the weights one token multiplies: attention projections (with ``kv_b`` as the absorbed ``W_UK``/``W_UV``
    products), indexer projections, router, shared + ``top_k`` routed experts."""
    c = config
    attention = (c.hidden_size * c.q_lora_rank + c.q_lora_rank * c.num_attention_heads * c.qk_head_dim
                 + c.hidden_size * (c.kv_lora_rank + c.qk_rope_head_dim)
                 + c.kv_lora_rank * c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim)
                 + c.num_attention_heads * c.v_head_dim * c.hidden_size)
    indexer = c.q_lora_rank * c.index_n_heads * c.index_head_dim + c.hidden_size * (c.index_head_dim + c.index_n_heads)
    expert = 3 * c.hidden_size * c.moe_intermediate_size
    return 2.0 * (attention + indexer + c.n_routed_experts * c.hidden_size
                  + (c.n_shared_experts + c.num_experts_per_tok) * expert)


def attention_flops(config: ModelConfig, visible: int, indexed: bool) -> float:
    """One query that sees ``visible`` keys: absorbed MLA over ``min(visible, topk)`` 576/512-wide entries, plus the
    indexer's scores over all ``visible`` keys when the sequence is long enough to be indexed."""
    c = config
    keys = min(visible, c.index_topk) if c.has_indexer else visible
    mla = 2.0 * c.num_attention_heads * (2 * c.kv_lora_rank + c.qk_rope_head_dim) * keys
    return mla + (2.0 * c.index_n_heads * c.index_head_dim * visible if indexed else 0.0)


def decode_work(config: ModelConfig, layer: DecoderLayer, layout: CacheLayout, batch: int, length: int,
                distinct_experts: int) -> Work:
    """Bytes and FLOPs of one decode step of ``batch`` sequences whose context is ``length`` + the new token."""
    dense, per_expert = weight_bytes(layer)
    visible = length + 1
    indexed = config.has_indexer and visible > config.index_topk
    keys = min(visible, config.index_topk) if config.has_indexer else visible
    kv = batch * (keys * layout.latent_width + (visible * layout.index_width if indexed else 0))
    kv *= torch.empty((), dtype=layout.storage_dtype).element_size()
    flops = batch * (linear_flops_per_token(config) + attention_flops(config, visible, indexed))
    return Work(dense + distinct_experts * per_expert + kv, flops)


def prefill_work(config: ModelConfig, layer: DecoderLayer, layout: CacheLayout, num_tokens: int,
                 distinct_experts: int) -> Work:
    """Bytes (weights + one pass over the new KV entries) and FLOPs of a ``num_tokens`` prefill from position 0."""
    dense, per_expert = weight_bytes(layer)
    indexed = config.has_indexer and num_tokens > config.index_topk
    kv = num_tokens * layout.bytes_per_token()
    flops = num_tokens * linear_flops_per_token(config)
    flops += sum(attention_flops(config, i + 1, indexed) for i in range(num_tokens))
    return Work(dense + distinct_experts * per_expert + kv, flops)


def device_peaks(name: str) -> tuple[float, float] | None:
    """``(HBM bytes/s, dense bf16 FLOP/s)`` of a known device name, else None."""
    for fragment, bandwidth, flops in DEVICE_PEAKS:
        if fragment in name:
            return bandwidth, flops
    return None


# ---- running ----------------------------------------------------------------------------------------------------


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Mean wall time of ``fn`` in ms (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - start) * 1e3 / iters
    torch.cuda.synchronize(device)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / iters


def cuda_graph(fn: Callable[[], object]) -> Callable[[], None]:
    """Capture ``fn`` (after warm-up on a side stream) and return the replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


class OurStep:
    """One forward of our layer over a fixed batch (metadata, RoPE tables and input built once)."""

    def __init__(self, config: ModelConfig, layer: DecoderLayer, cache: KVCache, batch: ForwardBatch,
                 dtype: torch.dtype, seed: int = 2) -> None:
        device = batch.input_ids.device
        self.layer, self.cache = layer, cache
        self.meta = batch.attention_metadata(cache.block_size)
        self.rope = RopeTables.build(rope_inv_freq(config).to(device), batch.positions, dtype, config.index_head_dim)
        gen = torch.Generator(device=device).manual_seed(seed)
        self.hidden = torch.randn(batch.num_tokens, config.hidden_size, generator=gen, device=device).to(dtype)

    @torch.inference_mode()
    def __call__(self) -> torch.Tensor:
        out, residual = self.layer(self.hidden, None, self.rope, self.meta, self.cache)
        return out + residual

    @torch.inference_mode()
    def distinct_experts(self) -> int:
        """How many routed experts this batch's tokens select (one extra forward, with a hook)."""
        seen: list[int] = []
        hook = self.layer.mlp.experts.register_forward_hook(
            lambda _module, args, _out: seen.append(int(args[2].unique().numel())))
        try:
            self()
        finally:
            hook.remove()
        return seen[0]


class HFStep:
    """One forward of HF's layer: a decode step over ``context`` (its DynamicCache reset to the context before every
    call, so each call sees the same ``length`` tokens), or a prefill from an empty cache."""

    def __init__(self, config: ModelConfig, hf_layer: nn.Module, hidden: torch.Tensor, positions: torch.Tensor,
                 context: Context | None) -> None:
        from transformers.models.deepseek_v32.modeling_deepseek_v32 import DeepseekV32RotaryEmbedding

        self.hf_layer, self.context, self.config = hf_layer, context, hf_config(config)
        batch, seq = hidden.shape[:2]
        self.hidden = hidden
        self.positions = positions
        rotary = DeepseekV32RotaryEmbedding(self.config).to(hidden.device)
        self.cos_sin = rotary(hidden, positions)
        keys = int(positions[0, -1]) + 1
        self.mask = torch.ones(seq, keys, dtype=torch.bool, device=hidden.device).tril(keys - seq)[None, None]
        self.mask = self.mask.expand(batch, 1, seq, keys)

    @torch.inference_mode()
    def __call__(self) -> torch.Tensor:
        from transformers import DynamicCache

        if self.context is None:
            cache = DynamicCache(config=self.config)
        else:
            cache = self.context.hf_cache
            layer = cache.layers[0]
            layer.keys, layer.values, layer.indexer_keys = self.context.hf_state
        return self.hf_layer(self.hidden, attention_mask=self.mask, position_ids=self.positions,
                             past_key_values=cache, position_embeddings=self.cos_sin)


def hf_bytes_needed(config: ModelConfig, batch: int, queries: int, keys: int) -> float:
    """Rough peak of HF's layer: per-head expanded keys+values of the whole context (``kv_b`` output and the
    concatenated keys), the fp32 indexer scores ``[B, S, H_I, T]`` and their ReLU, attention scores if SDPA falls
    back to the math kernel, the cache concatenation."""
    c = config
    expanded = 2 * batch * c.num_attention_heads * keys * (c.qk_head_dim + c.qk_nope_head_dim + c.v_head_dim)
    index_scores = 2 * 4 * batch * queries * c.index_n_heads * keys
    attention_scores = 2 * 2 * batch * c.num_attention_heads * queries * keys
    cache = 2 * 2 * batch * keys * (c.kv_latent_dim + c.index_head_dim)
    return expanded + index_scores + attention_scores + cache


@dataclass
class Result:
    case: str
    batch: int
    context: int
    tokens: int
    ms: float
    graph_ms: float | None
    gbps: float
    tflops: float
    bw_frac: float | None
    flops_frac: float | None
    hf_ms: float | None
    hf_note: str
    max_rel_diff: float | None


def run_case(case: str, config: ModelConfig, layer: DecoderLayer, hf_layer: nn.Module | None, cache: KVCache,
             batch: int, length: int, dtype: torch.dtype, peaks: tuple[float, float] | None, use_graph: bool,
             warmup: int, iters: int) -> Result:
    """Time our layer (and HF's) on one decode (``length`` cached tokens per sequence) or prefill (``length``
    tokens) case."""
    device = cache.latent[0].device
    decode = case == "decode"
    queries = 1 if decode else length
    keys = length + 1 if decode else length
    hf_note = "" if hf_layer is not None else "off"
    if hf_layer is not None and device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        need = hf_bytes_needed(config, batch, queries, keys)
        if need > 0.8 * free:
            hf_layer, hf_note = None, f"skipped (needs ~{need / 2**30:.0f} GiB)"
    context = fill_context(config, cache, batch, length, dtype, with_hf=hf_layer is not None) if decode else None
    fwd = decode_batch(context, device) if decode else prefill_batch(length, device)
    ours = OurStep(config, layer, cache, fwd, dtype)
    distinct = ours.distinct_experts()
    work = (decode_work(config, layer, cache.layout, batch, length, distinct) if decode
            else prefill_work(config, layer, cache.layout, length, distinct))
    ms = time_ms(ours, device, warmup, iters)
    graph_ms = None
    if use_graph and decode:
        try:
            graph_ms = time_ms(cuda_graph(ours), device, warmup, iters)
        except Exception as exc:  # a capture failure is a finding to report, not a reason to lose the eager numbers
            print(f"  CUDA graph capture failed ({type(exc).__name__}: {exc})", file=sys.stderr)
    best = min(ms, graph_ms) if graph_ms is not None else ms
    hf_ms = max_rel = None
    if hf_layer is not None:
        hidden = ours.hidden.view(batch, queries, -1)
        positions = fwd.positions.view(batch, queries)
        hf_step = HFStep(config, hf_layer, hidden, positions, context)
        try:
            expected = hf_step().reshape(-1, config.hidden_size).float()
            got = ours().float()
            max_rel = float((got - expected).abs().max() / expected.abs().max())
            hf_ms = time_ms(hf_step, device, min(warmup, 1), max(1, iters // 3))
            hf_note = "ok"
        except torch.cuda.OutOfMemoryError:
            hf_note = "out of memory"
        finally:
            del hf_step
            if device.type == "cuda":
                torch.cuda.empty_cache()
    bandwidth, flops = peaks if peaks else (None, None)
    gbps = work.bytes / (best * 1e-3) / 1e9
    tflops = work.flops / (best * 1e-3) / 1e12
    return Result(case, batch, length, batch * queries, ms, graph_ms, gbps, tflops,
                  gbps * 1e9 / bandwidth if bandwidth else None, tflops * 1e12 / flops if flops else None,
                  hf_ms, hf_note, max_rel)


def run_e2e(num_layers: int, batch: int, prompt_len: int, output_len: int) -> dict[str, float]:
    """``LLM.generate`` over a model of ``num_layers`` real-size layers (dummy weights, FP8 KV cache): tokens/s."""
    from dsv32.engine.llm import LLM
    from dsv32.engine.sampling_params import SamplingParams

    config = dataclasses.replace(real_config(), num_hidden_layers=num_layers,
                                 first_k_dense_replace=min(1, num_layers - 1), num_nextn_predict_layers=0)
    llm = LLM("tiny", model_config=config, dtype="bfloat16", kv_cache_dtype="fp8", device="cuda",
              max_num_seqs=batch, max_model_len=prompt_len + output_len + 1)
    gen = torch.Generator().manual_seed(0)
    prompts = [{"prompt_token_ids": torch.randint(2, config.vocab_size, (prompt_len,), generator=gen).tolist()}
               for _ in range(batch)]
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0)
    llm.generate(prompts[:1], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"layers": num_layers, "batch": batch, "prompt_len": prompt_len, "output_len": output_len,
            "seconds": elapsed, "output_tokens_per_s": generated / elapsed,
            "total_tokens_per_s": (generated + batch * prompt_len) / elapsed}


# ---- report -----------------------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: list[Result]) -> None:
    header = (f"{'case':8} {'batch':>5} {'ctx':>6} {'ms':>8} {'graph ms':>8} {'GB/s':>7} {'%BW':>5} {'TFLOP/s':>8} "
              f"{'%bf16':>6} {'HF ms':>9} {'speed-up':>8} {'max rel diff':>12}  HF")
    print(header)
    print("-" * len(header))
    for r in results:
        speedup = r.hf_ms / min(r.ms, r.graph_ms or r.ms) if r.hf_ms else None
        bw_pct = None if r.bw_frac is None else 100 * r.bw_frac
        flops_pct = None if r.flops_frac is None else 100 * r.flops_frac
        print(f"{r.case:8} {r.batch:>5} {r.context:>6} {r.ms:>8.3f} {_fmt(r.graph_ms, '8.3f'):>8} {r.gbps:>7.0f} "
              f"{_fmt(bw_pct, '5.1f'):>5} {r.tflops:>8.1f} {_fmt(flops_pct, '6.1f'):>6} {_fmt(r.hf_ms, '9.2f'):>9} "
              f"{_fmt(speedup, '8.1f'):>8} {_fmt(r.max_rel_diff, '12.2e'):>12}  {r.hf_note}")
    for batch in sorted({r.batch for r in results if r.case == "decode"}):
        times = {r.context: min(r.ms, r.graph_ms or r.ms) for r in results if r.case == "decode" and r.batch == batch}
        if len(times) > 1:
            lo, hi = min(times), max(times)
            print(f"decode batch {batch}: {hi} vs {lo} context = {times[hi] / times[lo]:.2f}x the time")


def parse_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=parse_ints, default=[1, 8, 64, 128])
    parser.add_argument("--contexts", type=parse_ints, default=[4096, 32768])
    parser.add_argument("--prefill", type=parse_ints, default=[4096, 16384])
    parser.add_argument("--kv-cache-dtype", choices=["fp8", "auto"], default="fp8")
    parser.add_argument("--bf16-experts", action="store_true", help="keep routed experts in bf16 instead of FP8")
    parser.add_argument("--no-hf", action="store_true", help="skip the HF transformers comparison")
    parser.add_argument("--cuda-graph", action="store_true", help="also time decode steps replayed from a CUDA graph")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--e2e-layers", type=int, default=0, help="also run LLM.generate over N real-size layers")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_layer.py: no CUDA device; this benchmark only runs on a GPU (H100/H200/B200).")
        return 1

    device, dtype = torch.device("cuda"), torch.bfloat16
    name = torch.cuda.get_device_name(device)
    peaks = device_peaks(name)
    config = real_config()
    print(f"device: {name}; peaks: {peaks and f'{peaks[0] / 1e12:.2f} TB/s, {peaks[1] / 1e12:.0f} bf16 TFLOP/s'}; "
          f"kernel backend: {get_backend(device).name}; KV cache: {args.kv_cache_dtype}; "
          f"routed experts: {'bf16' if args.bf16_experts else 'fp8 (128x128 scales)'}", flush=True)
    layer = build_layer(config, device, dtype, fp8_experts=not args.bf16_experts)
    hf_layer = None if args.no_hf else build_hf_layer(config, layer, device, dtype)
    tokens = max([b * (c + 1) for b in args.batches for c in args.contexts] + args.prefill + [1]) + BLOCK_SIZE
    cache = allocate_cache(config, args.kv_cache_dtype, dtype, tokens + max(args.batches, default=1) * BLOCK_SIZE,
                           device)
    results = []
    for context_len in args.contexts:
        for batch in args.batches:
            results.append(run_case("decode", config, layer, hf_layer, cache, batch, context_len, dtype, peaks,
                                    args.cuda_graph, args.warmup, args.iters))
            print(f"  done: decode batch {batch} context {context_len}", file=sys.stderr, flush=True)
    for num_tokens in args.prefill:
        results.append(run_case("prefill", config, layer, hf_layer, cache, 1, num_tokens, dtype, peaks, False,
                                min(args.warmup, 1), max(1, args.iters // 3)))
        print(f"  done: prefill {num_tokens}", file=sys.stderr, flush=True)
    print_table(results)
    report: dict[str, object] = {"device": name, "results": [dataclasses.asdict(r) for r in results]}
    if args.e2e_layers:
        del layer, hf_layer, cache
        torch.cuda.empty_cache()
        e2e = run_e2e(args.e2e_layers, batch=64, prompt_len=1024, output_len=128)
        print(f"LLM.generate, {e2e['layers']} real-size layers, batch {e2e['batch']}, {e2e['prompt_len']} in / "
              f"{e2e['output_len']} out: {e2e['output_tokens_per_s']:.0f} output tok/s, "
              f"{e2e['total_tokens_per_s']:.0f} total tok/s")
        report["e2e"] = e2e
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
