"""Build the model and fill its weights: HF safetensors checkpoints (sharded, FP8 block-scaled) or dummy weights.

Checkpoint names are HF's. Three renames happen here: per-expert ``mlp.experts.{e}.{gate,up,down}_proj.weight``
go into the stacked ``experts.gate_up_proj`` / ``experts.down_proj``; the MTP layers ``model.layers.{N+j}.*`` go to
``mtp.{j}.*`` (their copies of the embedding and LM head are dropped: they share the main model's); FP8 weights are
dequantised with their ``weight_scale_inv`` 128x128 block multipliers to the compute dtype, or, with ``keep_fp8``,
kept in e4m3 with those fp32 multipliers next to them (``Linear.weight_scale_inv``,
``Experts.{gate_up,down}_proj_scale_inv``): ``W[n, k] = W_fp8[n, k] * scale_inv[n // 128, k // 128]`` is then
formed inside the GEMMs (``dsv32.kernels`` ``fp8_linear`` / ``fused_moe``), for a quarter (fp32) or half (bf16) of
those weights' bytes. Tensors are read from the memory-mapped files one at a time.

Under tensor/expert parallelism each rank reads only its slice of every tensor (the memory-mapped slice is narrowed
before anything is copied; block scales are sliced with their weights) and skips the experts it does not hold, so a
rank's memory is its shard plus the replicated parts. Dummy weights are drawn at full shape, in the same order for
every layout, and then cut: TP=1 and TP=N are the same model.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from dsv32.config import ConfigError, ModelConfig, online_quantization
from dsv32.distributed.parallel import SINGLE_PROCESS, ParallelContext, validate_layout
from dsv32.kernels import int_weight_layout
from dsv32.kernels.fp8 import FP8_DTYPE, dequantize_block_fp8
from dsv32.kernels.quant import IntWeight, concat_rows, dequantize, narrow_int_weight, packable_codes
from dsv32.model.checkpoint_quant import CheckpointFormatError, is_companion, read_int_weight, weight_name
from dsv32.model.deepseek import DeepseekForCausalLM, Embedding
from dsv32.model.linear import Linear, narrow_padded
from dsv32.model.moe import FP8_BLOCK, Experts
from dsv32.model.quantize import quantize_model

logger = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
SCALE_SUFFIX = "_scale_inv"
# Checkpoint formats whose integer codes the loader hands to the packed kernels (``dsv32.model.checkpoint_quant``).
INT_CHECKPOINT_METHODS = ("w8a8_int8", "compressed-tensors")


class CheckpointError(ValueError):
    """A checkpoint that does not match the config: missing, misshapen or unknown tensors."""


def resolve_dtype(dtype: str | torch.dtype, config: ModelConfig) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return _DTYPES[config.torch_dtype]
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected auto, bfloat16, float16 or float32")
    return _DTYPES[dtype]


def cpu_has_native_half_matmul() -> bool:
    """Whether this CPU multiplies bf16/fp16 in hardware (AVX512-BF16/FP16 or AMX); without it PyTorch converts
    every operand to fp32 on the fly, which is slower than computing in fp32 outright."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16"))


def compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the model runs in: the requested one, except half precision on a CPU that lacks half-precision
    matmul units, which runs in fp32 (weights upcast once at load; results are at least as accurate)."""
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not cpu_has_native_half_matmul():
        logger.info("this CPU has no native %s matmul (AVX512-BF16/AMX): computing in float32", dtype)
        return torch.float32
    return dtype


def load_model(config: ModelConfig, path: str | None, load_format: str = "auto",
               dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu", seed: int = 0,
               with_mtp: bool = False, progress: bool = True, keep_fp8: bool | None = None,
               parallel: ParallelContext = SINGLE_PROCESS, quantization: str | None = None) -> DeepseekForCausalLM:
    """Instantiate ``DeepseekForCausalLM`` on ``device`` and load (or, for ``dummy``, generate) its weights
    (``parallel``: this rank's shard of them).

    ``keep_fp8``: keep the checkpoint's e4m3 weights as they are, with their block multipliers (default: on CUDA;
    on CPU the dequantised weights are as fast and the outputs are the same). Tensors the checkpoint stores in
    another dtype (norms, router, embeddings, LM head, ...) are loaded into the compute dtype either way.

    ``quantization``: vLLM's ``--quantization`` (``dsv32.config.online_quantization``): ``int8`` / ``int4`` quantise
    the covered weights at load (``dsv32.model.quantize``), after they are loaded (and dequantised from FP8)."""
    device = torch.device(device)
    online = online_quantization(quantization, config)
    if online is not None and int_weight_layout(device) is None:
        raise ConfigError(f"--quantization {online}: the INT8 / INT4 kernels run on CPU, or on CUDA with the triton "
                          f"package (device {device.type})")
    if keep_fp8 is None:
        keep_fp8 = device.type == "cuda"
    torch_dtype = compute_dtype(resolve_dtype(dtype, config), device)
    dummy = load_format == "dummy" or path is None
    validate_layout(config, parallel.world_size, parallel.expert_parallel, fp8_weights=not dummy,
                    data_parallel=parallel.data_parallel)
    with torch.device(device):
        model = DeepseekForCausalLM(config, torch_dtype, with_mtp=with_mtp, parallel=parallel)
    if dummy:
        init_dummy_weights(model, seed)
    elif load_format in ("auto", "safetensors"):
        load_safetensors(model, path, progress=progress, keep_fp8=keep_fp8)
    else:
        raise ValueError(f"load_format {load_format!r}: expected auto, safetensors or dummy")
    if online is not None:
        quantize_model(model, online)
    model.prepare_weights()
    return model.eval()


def init_dummy_weights(model: DeepseekForCausalLM, seed: int) -> None:
    """Deterministic random weights (vLLM's ``--load-format dummy``): N(0, 0.02) matrices, unit norms, a small
    random router bias so biased selection is exercised. Sharded parameters are drawn at full shape and cut."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith("norm.bias"):
                param.zero_()
            else:
                owner_name, _, leaf = name.rpartition(".")
                full_shape, narrow = _sharding(model.get_submodule(owner_name), leaf, param)
                std = 0.1 if name.endswith("e_score_correction_bias") else 0.02
                param.copy_(narrow(torch.randn(full_shape, generator=gen) * std))


def _sharding(owner: torch.nn.Module, leaf: str, param: torch.Tensor
              ) -> tuple[tuple[int, ...], Callable[[torch.Tensor], torch.Tensor]]:
    """The full (all-ranks) shape of ``owner.leaf`` and how this rank's part is cut from a tensor of that shape."""
    if isinstance(owner, Experts):
        return owner.full_shape(leaf), lambda full: owner.narrow_full(leaf, full)
    if isinstance(owner, (Linear, Embedding)) and leaf == "weight" and owner.shard is not None:
        shard, dim = owner.shard, owner.shard_dim
        return owner.full_shape, lambda full: narrow_padded(full, dim, shard)
    return tuple(param.shape), lambda full: full


def checkpoint_files(path: str) -> dict[str, str]:
    """Map tensor name -> safetensors file, from ``model.safetensors.index.json`` or the ``*.safetensors`` present."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint folder {path!r} does not exist")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as fh:
            weight_map = json.load(fh).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no 'weight_map'")
        return {name: os.path.join(path, file) for name, file in weight_map.items()}
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {path!r}")
    names: dict[str, str] = {}
    for file in files:
        with safe_open(os.path.join(path, file), framework="pt") as fh:
            names.update(dict.fromkeys(fh.keys(), os.path.join(path, file)))
    return names


class _Target:
    """Where a checkpoint tensor goes: a parameter, optionally one expert's slice of a stacked parameter, and which
    slice of the checkpoint tensor this rank reads (``dim``: ``None`` for all of it; ``start``/``count`` along it,
    into the first ``count`` rows of the destination, the rest being padding)."""

    def __init__(self, param: torch.Tensor, name: str, full_shape: tuple[int, ...], expert: int | None = None,
                 part: str | None = None, dim: int | None = None, start: int = 0, count: int = 0) -> None:
        self.param, self.name, self.full_shape, self.expert, self.part = param, name, full_shape, expert, part
        self.dim, self.start, self.count = dim, start, count

    def view(self, stacked: torch.Tensor | None = None) -> torch.Tensor:
        """This tensor's part of the parameter, or of ``stacked`` (stacked like it: the experts' block scales)."""
        whole = self.param if stacked is None else stacked
        if self.expert is None:
            return whole
        p = whole[self.expert]
        if self.part == "down_proj":
            return p
        half = p.shape[0] // 2
        return p[:half] if self.part == "gate_proj" else p[half:]

    def read(self, tensor_slice: Any, block: tuple[int, int] = (1, 1)) -> torch.Tensor:
        """This rank's slice of a memory-mapped safetensors tensor (``block``: rows/columns per stored entry, for
        the block scales of an FP8 weight)."""
        if self.dim is None:
            return tensor_slice[:]
        size = block[self.dim]
        lo, hi = self.start // size, -(-(self.start + self.count) // size)
        return tensor_slice[lo:hi] if self.dim == 0 else tensor_slice[:, lo:hi]

    @property
    def padded(self) -> bool:
        """Whether this rank's part is padded beyond the rows it reads (the last part of an uneven cut)."""
        return self.dim is not None and self.view().shape[self.dim] != self.count

    def destination(self) -> torch.Tensor:
        """Where the read slice goes (padding rows beyond it are zeroed)."""
        dest = self.view()
        if not self.padded:
            return dest
        with torch.no_grad():
            dest.zero_()
        return dest.narrow(self.dim, 0, self.count)


def _map_name(name: str, config: ModelConfig, with_mtp: bool) -> str | None:
    """Checkpoint name -> our parameter name (``None``: deliberately skipped)."""
    m = _LAYER.match(name)
    if m and int(m.group(1)) >= config.num_hidden_layers:
        j = int(m.group(1)) - config.num_hidden_layers
        rest = m.group(2)
        if not with_mtp or j >= config.num_nextn_predict_layers:
            return None
        if rest.startswith(("embed_tokens.", "shared_head.head.")):
            return None  # shared with the main model
        if rest.startswith("shared_head.norm."):
            return f"mtp.{j}.shared_head_norm.{rest.split('.', 2)[2]}"
        if rest.startswith(("enorm.", "hnorm.", "eh_proj.")):
            return f"mtp.{j}.{rest}"
        return f"mtp.{j}.block.{rest}"
    if name.endswith("rotary_emb.inv_freq"):
        return None
    return name


def load_safetensors(model: DeepseekForCausalLM, path: str, progress: bool = True, keep_fp8: bool = False) -> None:
    config = model.config
    with_mtp = len(model.mtp) > 0
    files = checkpoint_files(path)
    scales = {n for n in files if n.endswith(SCALE_SUFFIX)}
    block = config.quantization.weight_block_size if config.quantization else (128, 128)
    int_method = config.quantization.quant_method if config.quantization else None
    if int_method not in INT_CHECKPOINT_METHODS:
        int_method = None
    if keep_fp8 and int_method is None and (config.quantization is None or config.quantization.quant_method == "fp8"):
        _store_fp8(model, scales, with_mtp, block)
    params = dict(model.named_parameters())
    filled: set[tuple[str, int | None, str | None]] = set()
    staged: dict[str, list[tuple[_Target, IntWeight]]] = {}  # expert codes, packed once all are read
    by_file: dict[str, list[str]] = {}
    for name, file in files.items():
        if name not in scales and not (int_method and is_companion(name)):
            by_file.setdefault(file, []).append(name)
    bar = tqdm(total=sum(map(len, by_file.values())), desc="Loading safetensors", unit="tensor", disable=not progress)
    for file, names in by_file.items():
        with safe_open(file, framework="pt") as fh:
            for name in sorted(names):
                bar.update(1)
                target = _resolve(weight_name(name), model, with_mtp, params)
                if target is None:
                    continue
                if name not in fh.keys():
                    raise CheckpointError(f"tensor {name!r} listed in the index is missing from {file}")
                tensor_slice = fh.get_slice(name)
                shape = tuple(tensor_slice.get_shape())
                codes = _read_codes(int_method, config, name, tensor_slice, files) if int_method else None
                if codes is not None:
                    if codes.shape != tuple(target.full_shape):
                        raise CheckpointError(f"quantised tensor {name!r} holds a {codes.shape} weight, expected "
                                              f"{tuple(target.full_shape)} from config.json")
                    if target.dim is not None:  # this rank's part of the codes
                        codes = narrow_int_weight(codes, target.dim, target.start, target.count)
                    if target.padded or not _hold_codes(model, target, codes, staged):
                        with torch.no_grad():
                            target.destination().copy_(dequantize(codes, target.param.dtype))
                    filled.add((target.name, target.expert, target.part))
                    continue
                if shape != tuple(target.full_shape):
                    raise CheckpointError(f"tensor {name!r} has shape {shape}, expected {tuple(target.full_shape)} "
                                          "from config.json")
                tensor = target.read(tensor_slice)
                scale_name = name + SCALE_SUFFIX
                kept = target.param.dtype == FP8_DTYPE
                scale = None
                if tensor.dtype == FP8_DTYPE or tensor.dtype == torch.int8 and scale_name in files:  # blockwise_int8
                    if scale_name not in files:
                        raise CheckpointError(f"FP8 tensor {name!r} has no {scale_name!r}")
                    with safe_open(files[scale_name], framework="pt") as sf:
                        scale_slice = sf.get_slice(scale_name)
                        _check_scale_shape(tuple(scale_slice.get_shape()), scale_name, shape, block)
                        scale = target.read(scale_slice, block).float()
                    if not kept:
                        try:
                            tensor = dequantize_block_fp8(tensor, scale, block, target.param.dtype)
                        except ValueError as e:
                            raise CheckpointError(f"{scale_name}: {e}") from None
                elif kept:
                    raise CheckpointError(f"tensor {name!r} is {tensor.dtype}, but {target.name!r} is kept in e4m3 "
                                          "(the checkpoint has FP8 scales for it): load with keep_fp8=False")
                dest = target.destination()
                with torch.no_grad():
                    dest.copy_(tensor.to(dest.dtype))
                    if kept:
                        _scale_view(model, target).copy_(scale)
                filled.add((target.name, target.expert, target.part))
    bar.close()
    _pack_staged_experts(model, staged)
    _check_complete(model, params, filled)


def _read_codes(method: str, config: ModelConfig, name: str, tensor_slice: Any,
                files: dict[str, str]) -> IntWeight | None:
    """The integer codes of checkpoint tensor ``name`` (None: a plain tensor), companions read from their files."""

    def read(companion: str) -> torch.Tensor | None:
        if companion not in files:
            return None
        with safe_open(files[companion], framework="pt") as fh:
            return fh.get_tensor(companion)

    try:
        return read_int_weight(method, config.quantization.weight_bits, name, tensor_slice[:], read)
    except CheckpointFormatError as e:
        raise CheckpointError(str(e)) from None


def _hold_codes(model: DeepseekForCausalLM, target: _Target, codes: IntWeight,
                staged: dict[str, list[tuple[_Target, IntWeight]]]) -> bool:
    """Give ``target`` the codes themselves, for its device's integer kernels (an expert's are staged until its layer
    is read); False where they cannot be held and are to be dequantised at load instead: a device without integer
    kernels, a shape the kernels do not take, or ``kv_b_proj`` (MLA absorbs it in the compute dtype)."""
    layout = int_weight_layout(target.param.device)
    if layout is None:
        return False
    if target.expert is not None:
        staged.setdefault(target.name.rpartition(".")[0], []).append((target, codes))
        return True
    owner_name, _, leaf = target.name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if (not isinstance(owner, Linear) or leaf != "weight" or owner_name.endswith("kv_b_proj")
            or not packable_codes(codes, layout)):
        return False
    owner.quantize(codes)
    return True


def _pack_staged_experts(model: DeepseekForCausalLM, staged: dict[str, list[tuple[_Target, IntWeight]]]) -> None:
    """Quantise each layer's experts with the codes read for them (gate and up rows stacked per expert); a layer
    whose codes cannot be stacked or packed (mixed formats, differing act orders, a shape the kernels do not take)
    is dequantised into its compute-dtype stacks instead."""
    for prefix, entries in staged.items():
        experts = model.get_submodule(prefix)
        parts = {(target.expert, target.part): codes for target, codes in entries}
        count = experts.experts.count
        try:
            gate_up = [concat_rows(parts[(e, "gate_proj")], parts[(e, "up_proj")]) for e in range(count)]
            down = [parts[(e, "down_proj")] for e in range(count)]
        except (KeyError, ValueError):
            gate_up = down = []
        layout = int_weight_layout(experts.gate_up_proj.device)
        if gate_up and all(packable_codes(w, layout) for w in (*gate_up, *down)):
            experts.quantize(gate_up, down)
            continue
        with torch.no_grad():
            for target, codes in entries:
                target.destination().copy_(dequantize(codes, target.param.dtype))


def _store_fp8(model: DeepseekForCausalLM, scales: set[str], with_mtp: bool, block: tuple[int, int]) -> None:
    """Switch every weight that has a ``weight_scale_inv`` in the checkpoint to e4m3 storage with block scales, before
    anything is loaded (so the parameters are replaced once and loading fills them). Names that map to nothing of
    ours are left for the loading pass to report."""
    for scale_name in sorted(scales):
        mapped = _map_name(scale_name[:-len(SCALE_SUFFIX)], model.config, with_mtp)
        if mapped is None:
            continue
        m = _EXPERT.match(mapped)
        owner_name, _, leaf = mapped.rpartition(".")
        try:
            owner = model.get_submodule(m.group(1) if m else owner_name)
        except AttributeError:
            continue
        if m and isinstance(owner, Experts):
            stacked = "down_proj" if m.group(3) == "down_proj" else "gate_up_proj"
            if getattr(owner, stacked).dtype == FP8_DTYPE:
                continue
            if tuple(block) != (FP8_BLOCK, FP8_BLOCK):
                raise CheckpointError(f"{scale_name}: FP8 experts need {FP8_BLOCK}x{FP8_BLOCK} blocks to stay in FP8, "
                                      f"the checkpoint has {block[0]}x{block[1]}: load with keep_fp8=False")
            try:
                owner.to_fp8(stacked)
            except ValueError as e:
                raise CheckpointError(f"{scale_name}: {e}; load with keep_fp8=False") from None
        elif isinstance(owner, Linear) and leaf == "weight":
            owner.to_fp8(block)


def _check_scale_shape(scale_shape: tuple[int, ...], scale_name: str, shape: tuple[int, ...],
                       block: tuple[int, int]) -> None:
    """A weight of ``shape`` needs one scale per ``block``."""
    rows, cols = shape
    expected = (-(-rows // block[0]), -(-cols // block[1]))
    if scale_shape != expected:
        raise CheckpointError(f"{scale_name}: weight_scale_inv has shape {scale_shape}, expected {expected} "
                              f"for a {rows}x{cols} weight with {block[0]}x{block[1]} blocks")


def _scale_view(model: DeepseekForCausalLM, target: _Target) -> torch.Tensor:
    """Where the block scales of ``target`` go: the Linear's ``weight_scale_inv``, or this expert's rows of the
    stacked ``*_proj_scale_inv`` (gate then up, like the weight)."""
    owner_name, _, leaf = target.name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if target.expert is None:
        return owner.weight_scale_inv
    return target.view(getattr(owner, f"{leaf}_scale_inv"))


def _resolve(name: str, model: DeepseekForCausalLM, with_mtp: bool,
             params: dict[str, torch.nn.Parameter]) -> _Target | None:
    """Where checkpoint tensor ``name`` goes on this rank; ``None``: nowhere (skipped on purpose, or an expert
    another rank holds)."""
    config = model.config
    mapped = _map_name(name, config, with_mtp)
    if mapped is None:
        return None
    m = _EXPERT.match(mapped)
    if m:
        prefix, expert, part = m.group(1), int(m.group(2)), m.group(3)
        pname = f"{prefix}.{'down_proj' if part == 'down_proj' else 'gate_up_proj'}"
        owner = model.get_submodule(prefix) if pname in params else None
        if not isinstance(owner, Experts) or expert >= owner.total_experts:
            raise CheckpointError(f"unexpected tensor {name!r} (expert {expert} does not exist in this config)")
        if not owner.experts.contains(expert):
            return None
        hidden = owner.gate_up_proj.shape[2]
        dim = 1 if part == "down_proj" else 0
        full_shape = (hidden, owner.full_inter) if part == "down_proj" else (owner.full_inter, hidden)
        start, count = owner.inter_shard.bounds(owner.full_inter)
        return _Target(params[pname], pname, full_shape, expert - owner.experts.first, part,
                       dim if owner.inter_shard.size > 1 else None, start, count)
    if mapped not in params:
        raise CheckpointError(f"unexpected tensor {name!r} in the checkpoint (not part of a "
                              f"{config.architecture} with this config.json)")
    param = params[mapped]
    owner_name, _, leaf = mapped.rpartition(".")
    owner = model.get_submodule(owner_name)
    if isinstance(owner, (Linear, Embedding)) and leaf == "weight" and owner.shard is not None:
        start, count = owner.shard.bounds(owner.full_shape[owner.shard_dim])
        return _Target(param, mapped, owner.full_shape, dim=owner.shard_dim, start=start, count=count)
    return _Target(param, mapped, tuple(param.shape))


def _check_complete(model: DeepseekForCausalLM, params: dict[str, torch.nn.Parameter],
                    filled: set[tuple[str, int | None, str | None]]) -> None:
    """Every parameter (every expert this rank holds) was filled; else name what is missing."""
    done_whole = {n for n, e, _ in filled if e is None}
    missing: list[str] = []
    for name, param in params.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")) and name not in done_whole:
            prefix, _, leaf = name.rpartition(".")
            first = model.get_submodule(prefix).experts.first
            parts = ("down_proj",) if leaf == "down_proj" else ("gate_proj", "up_proj")
            missing += [f"{prefix}.{first + e}.{p}.weight" for e in range(param.shape[0]) for p in parts
                        if (name, e, p) not in filled]
        elif name not in done_whole:
            missing.append(name)
    if "lm_head.weight" in missing and model.config.tie_word_embeddings:
        with torch.no_grad():
            model.lm_head.weight.copy_(model.model.embed_tokens.weight)
        missing.remove("lm_head.weight")
    if "model.layers.0.mlp.gate.e_score_correction_bias" in missing:
        # V3-style checkpoints without the aux-free bias: selection is then plain top-k (bias 0, as initialised).
        missing = [m for m in missing if not m.endswith("e_score_correction_bias")]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s): {shown}")
