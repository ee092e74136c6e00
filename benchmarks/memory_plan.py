#!/usr/bin/env python
"""Paper memory plan for the real DeepSeek-V3.2 on 8 GPUs: weight bytes, KV bytes per token and cache tokens per GPU.

Every tensor dsv32 keeps on a GPU is enumerated from the model itself: ``DeepseekForCausalLM`` is built on the meta
device from ``ModelConfig()`` (the real V3.2 config), with the checkpoint's FP8 weights switched to e4m3 + 128x128 fp32
block scales as the loader does on CUDA (``keep_fp8``), plus the derived weights MLA makes at load: ``kv_b_proj``
dequantised to bf16 and its absorbed parts ``W_UK`` / ``W_UV`` as contiguous bf16 copies (2 x 32 MiB per layer,
before sharding). So the dtypes are dsv32's, not the checkpoint's where they differ: the router gate and the
indexer's ``weights_proj`` are bf16 in the checkpoint but kept in fp32 here.
Each tensor gets a sharding rule per layout:

``TP8`` (``-tp 8``, vLLM's DeepSeek sharding)
    ``q_b_proj`` / ``kv_b_proj`` column-parallel by head (16 heads per GPU), ``o_proj`` row-parallel; ``q_a_proj``,
    ``kv_a_proj_with_mqa``, every norm, the whole lightning indexer and the router gate replicated; dense MLP and
    shared expert column/row-parallel (intermediate / 8); routed experts split along ``moe_intermediate_size``
    (2048 / 8 = 256 per GPU, all 256 experts on every GPU); embedding and LM head vocab-parallel (129280 / 8).
``TP8+EP8`` (``-tp 8 --enable-expert-parallel``)
    as TP8, but the routed experts whole: 256 / 8 = 32 experts per GPU.
``DP8-attn+EP8`` (``-dp 8 --enable-expert-parallel``; SGLang ``--tp 8 --dp 8 --enable-dp-attention --ep 8``)
    as ``dsv32/distributed/parallel.py`` lays it out, which is SGLang's default: attention (MLA + indexer) and the
    embedding replicated (attention tp_size 1); dense MLP, shared expert and LM head split over all 8
    (SGLang: ``--moe-dense-tp-size`` None, ``--enable-dp-lm-head`` off); routed experts EP8.

KV cache: the MLA latent ``[c ; k_pe]`` plus the indexer key, per token per layer, as ``dsv32.kernels.cache_format``
stores it (``auto`` = bf16: 1152 + 256 = 1408 B; ``fp8``: 656 + 132 = 788 B), over the 61 layers (+1 with the MTP
layer, i.e. only with speculative decoding: ``--speculative``). Under TP every rank holds every token's latent (MLA
has one latent for all heads: nothing to split by head), so a token costs the full bytes on every GPU and the cluster
holds as many tokens as one GPU. Under DP attention each rank caches only its own requests: the same bytes per token
per GPU, and the cluster holds 8x the tokens.

Tokens that fit, per GPU: ``floor((utilization x capacity - weights - reserve) / KV bytes per token)``, rounded down to
whole blocks, as ``dsv32.engine.runner.plan_kv_cache`` does. ``reserve`` stands for what the engine's profiling
step measures besides the weights (see ``DEFAULT_RESERVE_GIB``).

``--weights int8`` / ``int4``: the bf16 checkpoint quantised as ``--quantization int8|int4`` holds it
(``dsv32.model.quantize``): the covered projections and experts as int8 codes with one bf16 scale per output row, or
as 4-bit codes (two a byte) with a bf16 (scale, offset) pair per 128-column group; the rest in bf16. A per-row scale
is held whole by every rank of a row-parallel split. (dsv32's INT kernels run on CPU; the bytes are the same for a
GPU's W8A16 / W4A16 layouts.)

usage: memory_plan.py [--gpu-memory-utilization 0.9] [--reserve-gib 6] [--speculative] [--block-size 64]
                      [--world-size 8] [--weights fp8|int8|int4] [--gpu H200 B200 A100-80GB A100-40GB]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
from dataclasses import dataclass

import torch

# Run from a checkout: the repository root, not this folder, is where ``dsv32`` lives.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsv32.config import EngineConfig, ModelConfig  # noqa: E402
from dsv32.engine.runner import plan_kv_cache  # noqa: E402
from dsv32.kernels.fp8 import FP8_DTYPE  # noqa: E402
from dsv32.kernels.quant import INT4_GROUP_SIZE  # noqa: E402
from dsv32.model.deepseek import DeepseekForCausalLM  # noqa: E402
from dsv32.model.linear import Linear  # noqa: E402
from dsv32.model.mla import MLA  # noqa: E402
from dsv32.model.moe import FP8_BLOCK, Experts  # noqa: E402
from dsv32.model.quantize import QUANTIZED_PROJECTIONS  # noqa: E402

GiB = 1 << 30
WORLD_SIZE = 8
KV_CACHE_DTYPES = ("auto", "fp8")  # auto = the compute dtype (bf16)

# The checkpoint's Linear weights WITHOUT a weight_scale_inv (spec/model.md section 8): stored bf16, kept in the
# compute dtype (weights_proj is declared fp32 by our Indexer). Every other Linear and every expert is e4m3 + scales.
UNSCALED_LINEARS = ("lm_head", "indexer.weights_proj", "eh_proj")

# Reserve per GPU for everything the engine's profiling step sees besides the weights, at max_num_batched_tokens 8192
# (CUDA graphs on): CUDA context + cuBLAS/Triton workspaces ~1 GiB; NCCL communicators and buffers ~1 GiB; the CUDA
# graph memory pool ~1-2 GiB; the activations of an 8192-token step ~2 GiB (residual stream + normed input
# 2 x 8192 x 7168 x 2 B = 0.23 GiB, the MoE's [8192 x 8, 2 x I_local] intermediates, per-head attention queries
# [8192, heads, 576] = 1.2 GiB at 128 local heads (DP attention), indexer scores of one 8192-token chunk
# 8192^2 x 4 B = 0.25 GiB, sampled rows' logits). An estimate, not a measurement: no GPU was used for this plan.
DEFAULT_RESERVE_GIB = 6.0


@dataclass(frozen=True)
class Gpu:
    """``capacity``: what ``torch.cuda.mem_get_info`` reports as total (dsv32's budget is ``utilization x capacity``),
    as PyTorch prints it in its OOM message ("GPU 0 has a total capacity of ... GiB")."""

    name: str
    capacity: int


GPUS = (
    # H200 "141 GB HBM3e": nvidia-smi 143771 MiB; PyTorch "total capacity of 139.80 GiB" (seen in many public OOM
    # reports from 8xH200 nodes).
    Gpu("H200", int(139.80 * GiB)),
    # B200 (HBM3e, 192 GB raw, 180 GB usable per DGX B200's 1440 GB): nvidia-smi 183359 MiB
    # (NVIDIA/TensorRT-LLM#10278, 8xB200 running DeepSeek-V3.2-Exp); PyTorch "total capacity of 178.35 GiB".
    Gpu("B200", int(178.35 * GiB)),
)
# The cards people plan quantised deployments on (--gpu picks them).
A100_GPUS = (
    # A100-SXM4-80GB: nvidia-smi 81920 MiB; PyTorch "total capacity of 79.15 GiB" (public OOM reports).
    Gpu("A100-80GB", int(79.15 * GiB)),
    # A100-SXM4-40GB / PCIe 40GB: nvidia-smi 40960 MiB; PyTorch "total capacity of 39.39 GiB".
    Gpu("A100-40GB", int(39.39 * GiB)),
)
ALL_GPUS = GPUS + A100_GPUS
WEIGHT_FORMATS = ("fp8", "int8", "int4")


@dataclass(frozen=True)
class TensorSpec:
    """One tensor dsv32 keeps on the GPU: its name (ours, as in ``named_parameters``), shape, bytes per element,
    sharding role and whether it is an FP8 weight (whose shards must keep whole 128x128 blocks)."""

    name: str
    shape: tuple[int, ...]
    itemsize: float  # bytes per element: 0.5 for 4-bit codes
    role: str
    fp8: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return math.ceil(self.numel * self.itemsize)


# Sharding roles, first match wins; a name matching none is replicated (norms, q_a_proj, kv_a_proj_with_mqa, the
# indexer, the router gate, the MTP eh_proj, RoPE frequencies).
ROLE_PATTERNS = (
    (r"\.indexer\.", "replicated"),
    (r"\.self_attn\.(q_b_proj|kv_b_proj)\.|\.mla_weights\.", "attn_column"),
    (r"\.self_attn\.o_proj\.", "attn_row"),
    (r"\.experts\.gate_up_proj", "experts_gate_up"),
    (r"\.experts\.down_proj", "experts_down"),
    (r"\.mlp\.(shared_experts\.)?(gate_proj|up_proj)\.", "mlp_column"),
    (r"\.mlp\.(shared_experts\.)?down_proj\.", "mlp_row"),
    (r"^model\.embed_tokens\.", "embedding"),
    (r"^lm_head\.", "lm_head"),
)

# Components for the per-GPU breakdown, first match wins.
COMPONENT_PATTERNS = (
    (r"\.mlp\.experts\.", "routed experts"),
    (r"\.shared_experts\.", "shared expert"),
    (r"\.mlp\.gate\.", "router gate"),
    (r"\.mlp\.", "dense MLP (layers 0-2)"),
    (r"\.indexer\.", "lightning indexer"),
    (r"\.self_attn\.|\.mla_weights\.", "MLA (incl. bf16 kv_b copies)"),
    (r"^(model\.embed_tokens|lm_head)\.", "embedding + LM head"),
)


def _first_match(name: str, patterns: tuple[tuple[str, str], ...], default: str) -> str:
    return next((label for pattern, label in patterns if re.search(pattern, name)), default)


def component(name: str) -> str:
    return _first_match(name, COMPONENT_PATTERNS, "norms, MTP eh_proj, RoPE")


@dataclass(frozen=True)
class Layout:
    """A parallel layout of ``world_size`` GPUs: which dim each sharding role splits (None: replicated), and whether
    every rank caches every token (TP attention) or only its own DP rank's."""

    name: str
    flags: str
    split_dim: dict[str, int | None]
    kv_replicated: bool
    world_size: int = WORLD_SIZE

    def shard_shape(self, spec: TensorSpec) -> tuple[int, ...]:
        """The shape one rank holds; refuses a split that is uneven or breaks an FP8 128x128 block."""
        dim = self.split_dim.get(spec.role)
        if dim is None or spec.shape[dim] == 1:  # replicated, or a per-row scale's single column: held whole
            return spec.shape
        size = spec.shape[dim]
        if size % self.world_size:
            raise ValueError(f"{self.name}: {spec.name} dim {dim} ({size}) does not split {self.world_size} ways")
        part = size // self.world_size
        # Dims of FP8 weights are in elements; 3-D expert weights carry the expert in dim 0 (whole experts under EP).
        if spec.fp8 and not (spec.role.startswith("experts") and dim == 0) and part % FP8_BLOCK:
            raise ValueError(f"{self.name}: {spec.name} dim {dim} shard of {part} breaks the {FP8_BLOCK}x{FP8_BLOCK} "
                             "FP8 blocks")
        return spec.shape[:dim] + (part,) + spec.shape[dim + 1:]

    def shard_bytes(self, spec: TensorSpec) -> int:
        return math.ceil(math.prod(self.shard_shape(spec)) * spec.itemsize)

    def is_split(self, spec: TensorSpec) -> bool:
        return self.split_dim.get(spec.role) is not None

    def weight_bytes_per_gpu(self, specs: list[TensorSpec]) -> int:
        return sum(self.shard_bytes(s) for s in specs)


def make_layouts(n: int = WORLD_SIZE) -> tuple[Layout, Layout, Layout]:
    """TP, TP+EP and DP-attention+EP over ``n`` GPUs (8: one machine; 16: two)."""
    tp = {"attn_column": 0, "attn_row": 1, "mlp_column": 0, "mlp_row": 1, "embedding": 0, "lm_head": 0}
    return (
        Layout(f"TP{n}", f"-tp {n}", {**tp, "experts_gate_up": 1, "experts_down": 2}, kv_replicated=True,
               world_size=n),
        Layout(f"TP{n}+EP{n}", f"-tp {n} --enable-expert-parallel", {**tp, "experts_gate_up": 0, "experts_down": 0},
               kv_replicated=True, world_size=n),
        # Attention, indexer and embedding replicated; dense MLP, shared expert and head still split (SGLang's default).
        Layout(f"DP{n}-attn+EP{n}", f"-dp {n} --enable-expert-parallel",
               {"mlp_column": 0, "mlp_row": 1, "lm_head": 0, "experts_gate_up": 0, "experts_down": 0},
               kv_replicated=False, world_size=n),
    )


LAYOUTS = make_layouts()
TP8, TP8_EP8, DP8_EP8 = LAYOUTS


def build_model(config: ModelConfig, with_mtp: bool, weights: str = "fp8") -> DeepseekForCausalLM:
    """The model on the meta device, weights stored as the loader stores a FP8 checkpoint on CUDA (``weights``
    ``fp8``; else bf16, quantised in ``enumerate_tensors``), derived MLA weights made. No memory is allocated."""
    block = config.quantization.weight_block_size if config.quantization else (FP8_BLOCK, FP8_BLOCK)
    with torch.device("meta"):
        model = DeepseekForCausalLM(config, torch.bfloat16, with_mtp=with_mtp)
        for name, module in model.named_modules():
            if weights != "fp8":
                break
            if isinstance(module, Linear) and not name.endswith(UNSCALED_LINEARS):
                module.to_fp8(block)
            elif isinstance(module, Experts):
                module.to_fp8("gate_up_proj")
                module.to_fp8("down_proj")
        for module in model.modules():
            if isinstance(module, MLA):
                module.prepare_weights()
    return model


def enumerate_tensors(model: DeepseekForCausalLM, weights: str = "fp8") -> list[TensorSpec]:
    """Every tensor the model keeps: parameters, buffers (block scales, RoPE frequencies) and MLA's derived weights
    (``MLAWeights``: the bf16 ``kv_b`` and its absorbed parts, counted where they own memory, not where views)."""
    named: list[tuple[str, torch.Tensor]] = [*model.named_parameters(), *model.named_buffers()]
    for name, module in model.named_modules():
        if isinstance(module, MLA):
            derived = module.mla_weights
            named += [(f"{name}.mla_weights.{f.name}", getattr(derived, f.name)) for f in dataclasses.fields(derived)
                      if getattr(derived, f.name)._base is None]
    specs = [TensorSpec(name, tuple(t.shape), t.element_size(), _first_match(name, ROLE_PATTERNS, "replicated"),
                        t.dtype == FP8_DTYPE) for name, t in named]
    return specs if weights == "fp8" else [q for spec in specs for q in _quantized(spec, weights)]


def _quantized(spec: TensorSpec, weights: str) -> list[TensorSpec]:
    """``spec`` as ``--quantization weights`` holds it: a covered weight becomes its codes and scales."""
    owner = spec.name.rpartition(".")[0].rpartition(".")[2]
    covered = spec.name.endswith(("experts.gate_up_proj", "experts.down_proj")) or (
        spec.name.endswith(".weight") and owner in QUANTIZED_PROJECTIONS)
    if not covered:
        return [spec]
    *lead, cols = spec.shape
    if weights == "int8":  # int8 codes, one bf16 scale per output row
        return [dataclasses.replace(spec, itemsize=1),
                dataclasses.replace(spec, name=spec.name + ".scale", shape=(*lead, 1), itemsize=2)]
    groups = cols // INT4_GROUP_SIZE  # two codes a byte, a bf16 (scale, offset) pair per group
    return [dataclasses.replace(spec, itemsize=0.5),
            dataclasses.replace(spec, name=spec.name + ".scales", shape=(*lead, groups), itemsize=4)]


def checkpoint_param_count(specs: list[TensorSpec]) -> int:
    """Weight elements as the checkpoint counts them: no block scales, no derived tensors."""
    return sum(s.numel for s in specs if not _is_scale_or_derived(s.name))


def scale_count(specs: list[TensorSpec]) -> int:
    return sum(s.numel for s in specs if s.name.endswith("_scale_inv"))


def _is_scale_or_derived(name: str) -> bool:
    return name.endswith(("_scale_inv", "inv_freq", ".scale", ".scales")) or ".mla_weights." in name


@dataclass(frozen=True)
class PlanRow:
    layout: Layout
    gpu: Gpu
    weight_bytes: int
    kv_bytes_per_token: dict[str, int]  # per KV cache dtype
    tokens_per_gpu: dict[str, int]

    def cluster_tokens(self, kv_dtype: str) -> int:
        per_gpu = self.tokens_per_gpu[kv_dtype]
        return per_gpu if self.layout.kv_replicated else per_gpu * self.layout.world_size


def cache_tokens(budget: int, bytes_per_token: int, block_size: int, config: ModelConfig) -> int:
    """Tokens the KV cache holds in ``budget`` bytes, whole blocks, as the engine plans it (0 if not one block)."""
    if budget < bytes_per_token * block_size:
        return 0
    engine = EngineConfig(kv_cache_memory=budget, block_size=block_size)
    return plan_kv_cache(engine, config, bytes_per_token, None).max_tokens


def plan(model: DeepseekForCausalLM, utilization: float = 0.9, reserve_bytes: int = int(DEFAULT_RESERVE_GIB * GiB),
         block_size: int = 64, layouts: tuple[Layout, ...] = LAYOUTS, gpus: tuple[Gpu, ...] = GPUS,
         weights: str = "fp8") -> list[PlanRow]:
    """One row per layout and GPU for ``model`` (from ``build_model``)."""
    specs = enumerate_tensors(model, weights)
    kv = {dtype: model.kv_cache_bytes_per_token(dtype) for dtype in KV_CACHE_DTYPES}
    rows = []
    for layout in layouts:
        weights = layout.weight_bytes_per_gpu(specs)
        for gpu in gpus:
            budget = int(gpu.capacity * utilization) - weights - reserve_bytes
            tokens = {dtype: cache_tokens(budget, kv[dtype], block_size, model.config) for dtype in KV_CACHE_DTYPES}
            rows.append(PlanRow(layout, gpu, weights, kv, tokens))
    return rows


def markdown_table(rows: list[PlanRow]) -> str:
    lines = ["| layout | GPU | weights / GPU | KV B/token/GPU bf16 / fp8 | cache tokens / GPU bf16 / fp8 | "
             "cache tokens / cluster bf16 / fp8 |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.layout.name} (`{r.layout.flags}`) | {r.gpu.name} ({r.gpu.capacity / GiB:.2f} GiB) "
                     f"| {r.weight_bytes / GiB:.1f} GiB "
                     f"| {r.kv_bytes_per_token['auto']:,} / {r.kv_bytes_per_token['fp8']:,} "
                     f"| {r.tokens_per_gpu['auto']:,} / {r.tokens_per_gpu['fp8']:,} "
                     f"| {r.cluster_tokens('auto'):,} / {r.cluster_tokens('fp8'):,} |")
    return "\n".join(lines)


def breakdown_table(specs: list[TensorSpec], layouts: tuple[Layout, ...] = LAYOUTS) -> str:
    """GiB per GPU of each component under each layout, largest last-layout share first."""
    parts: dict[str, list[TensorSpec]] = {}
    for spec in specs:
        parts.setdefault(component(spec.name), []).append(spec)
    per_gpu = {name: [layout.weight_bytes_per_gpu(part) for layout in layouts] for name, part in parts.items()}
    lines = ["| component | " + " | ".join(layout.name for layout in layouts) + " |",
             "|---|" + "---:|" * len(layouts)]
    for name, sizes in sorted(per_gpu.items(), key=lambda item: -item[1][-1]):
        lines.append(f"| {name} | " + " | ".join(f"{size / GiB:.2f}" for size in sizes) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--reserve-gib", type=float, default=DEFAULT_RESERVE_GIB,
                        help="Per-GPU activations, CUDA graphs, NCCL and CUDA context (default %(default)s).")
    parser.add_argument("--speculative", action="store_true",
                        help="Count the MTP layer (weights and its KV layer), as --speculative-config loads it.")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--world-size", type=int, default=WORLD_SIZE, help="GPUs in all (16: two 8-GPU machines).")
    parser.add_argument("--weights", choices=WEIGHT_FORMATS, default="fp8",
                        help="The checkpoint's FP8 kept (default), or bf16 quantised online (--quantization).")
    parser.add_argument("--gpu", nargs="+", choices=[gpu.name for gpu in ALL_GPUS], default=["H200", "B200"])
    args = parser.parse_args(argv)
    layouts = make_layouts(args.world_size)
    config = ModelConfig()
    model = build_model(config, args.speculative, args.weights)
    specs = enumerate_tensors(model, args.weights)
    gpus = tuple(gpu for gpu in ALL_GPUS if gpu.name in args.gpu)
    rows = plan(model, args.gpu_memory_utilization, int(args.reserve_gib * GiB), args.block_size, layouts, gpus,
                args.weights)
    layers = config.num_hidden_layers + (config.num_nextn_predict_layers if args.speculative else 0)
    mtp = "MTP layer loaded, sharing the embedding and LM head" if args.speculative else "MTP layer not loaded"
    print(f"DeepSeek-V3.2 ({checkpoint_param_count(specs) / 1e9:.2f}B weights held as {args.weights}, {mtp}), "
          f"{args.world_size} GPUs, "
          f"--gpu-memory-utilization {args.gpu_memory_utilization}, reserve {args.reserve_gib:g} GiB/GPU, "
          f"KV over {layers} layers, sizes in GiB (2^30 B)\n")
    print(markdown_table(rows))
    print("\nWeights per GPU by component (GiB):\n")
    print(breakdown_table(specs, layouts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
