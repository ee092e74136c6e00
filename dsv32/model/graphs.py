"""Captured decode steps: the CPU counterpart of CUDA graphs (vLLM's ``cudagraph_capture_sizes``).

A decode step of a small model is mostly overhead: a few hundred small torch ops with Python between them (a 4-layer
step measured 7 ms eager for ~1 ms of arithmetic). ``DecodeGraphs`` compiles the model's ``decode_forward`` (the
step as a function of tensors alone: token ids, positions, cache slots, context slots and lengths, and the paged
cache) with ``torch.compile``: Inductor generates C++ for the pointwise chains between the GEMMs (norms, RoPE,
routing, softmax), packs the frozen weights for oneDNN once, and its C++ wrapper calls the kernels without Python
in between.

Shapes: a step of ``B`` decodes is padded to the next capture size ``B'`` (its padding rows read and write the
cache's ``scratch_block``); the context width ``L`` (the longest context of the step) is a dynamic dimension, padded
up to ``index_topk + 1`` with the lightning indexer (so every step takes the same top-k path: a context shorter than
that has all its positions selected, exactly what the uncompiled step attends) and to 2 without it, then to a
multiple of ``CONTEXT_WIDTH_GRANULE`` (so the GEMMs over the context do not take a new shape every step). Batch size 1
is compiled on its own (its shapes static but ``L``; with Inductor's autotuned C++ GEMMs, and its LM head compiled
too: ``logits``), the other sizes share one graph with a dynamic batch dimension; the fixed-shape MoE
(``fused_moe_fixed_shape``) switches formulation at ``B' * top_k > n_experts``, one more graph. Every graph is
compiled when the runner warms the sizes up at start-up (``capture``), never while serving.

Steps that are not decode-only (prefill chunks, speculative verification), larger than the largest capture size or
split by data-parallel attention run eagerly, as does everything with ``--enforce-eager``. On CUDA the same
mechanism would add CUDA graphs per capture size (``triton.cudagraphs``); it is not enabled there yet.
"""

from __future__ import annotations

import bisect
import logging
import time
import types
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from dsv32.kernels import trace_with
from dsv32.model.batch import ForwardBatch
from dsv32.model.cache import KVCache

if TYPE_CHECKING:
    from dsv32.model.deepseek import DeepseekForCausalLM

logger = logging.getLogger(__name__)

# vLLM's capture sizes, the ones a CPU engine reaches: a step of B decodes runs on the smallest size >= B.
DEFAULT_CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)

# The context width a graph runs at is rounded up to a multiple of this. oneDNN builds (JIT-compiles) a primitive for
# every new shape of a bf16 GEMM, ~0.7-1 ms here against ~30 us to run one: a width growing by one position per step
# would pay that at every step for the indexer's scoring GEMM ([L, D] keys). Padded, a new shape comes once every
# 64 steps, for at most 63 masked positions scored in vain (~0.4 us each at any context on 2 cores).
CONTEXT_WIDTH_GRANULE = 64


def _kept_guards(entries: Sequence[Any]) -> list[bool]:
    """Dynamo's guards worth checking before each call: the global state, the shapes of the step's input tensors
    (they pick the graph) and the identity of the tensors frozen into it (they pin the graph to this model: another
    model in the process has its own). The ~1,000 guards on the modules' structure (types, hook dicts, config
    constants) re-check at every call what cannot change after loading: ~0.6 ms a step for the tiny model."""
    return [entry.guard_type in ("GLOBAL_STATE", "SHAPE_ENV", "TENSOR_MATCH", "ID_MATCH") for entry in entries]


# Inductor's settings for the captured step: weights are constants (packed for oneDNN once), the C++ wrapper calls
# the kernels without Python between them, and only the guards that pick a graph are checked.
_INDUCTOR_OPTIONS = {"freezing": True, "cpp_wrapper": True, "guard_filter_fn": _kept_guards}
# Batch 1's (its step and its LM head): Inductor's C++ GEMM templates, autotuned against ATen's GEMMs at capture. One
# row times the 129280-row LM head takes ~1.3 ms here against ~2.5 ms with oneDNN's packed GEMV (the largest cost of
# a tiny model's step), the tiny model's step 1.65 against 1.9 ms (batch-1 decode 0.89x llama.cpp against 0.52x with
# the head alone autotuned). At index_topk 2048 its dynamic-shape templates for the context-wide products are slower
# than oneDNN's (1K context: 103 against 124-148 tok/s). Batched steps keep ATen's GEMMs: autotuning them tripled the
# start-up (210 s for sizes 1-8) for no gain at 8 rows.
_ONE_ROW_OPTIONS = {**_INDUCTOR_OPTIONS, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}


def capture_sizes(max_num_seqs: int, sizes: Sequence[int] | None = None) -> tuple[int, ...]:
    """The batch sizes captured for an engine of ``max_num_seqs`` sequences: ``sizes`` (default
    ``DEFAULT_CAPTURE_SIZES``) up to ``max_num_seqs``, and ``max_num_seqs`` itself when it falls between two."""
    chosen = sorted({s for s in (sizes or DEFAULT_CAPTURE_SIZES) if 0 < s <= max_num_seqs})
    if sizes is None and (not chosen or chosen[-1] < max_num_seqs) and max_num_seqs <= DEFAULT_CAPTURE_SIZES[-1]:
        chosen.append(max_num_seqs)
    return tuple(chosen)


class DecodeGraphs:
    """The compiled decode step of one model (one rank's shard) for batch sizes ``sizes``."""

    def __init__(self, model: DeepseekForCausalLM, sizes: Sequence[int]) -> None:
        self.model = model
        self.sizes = tuple(sorted(sizes))
        config = model.config
        self.min_width = config.index_topk + 1 if config.has_indexer else 2
        self.captured: set[int] = set()
        self.steps_run = 0  # steps served by a graph (the others ran eagerly)
        # Sharded over ranks, Inductor's C++ GEMM template fails to render an epilogue of the step (an assertion in
        # its codegen, torch 2.13): the step of a multi-rank model keeps ATen's GEMMs.
        one_row_options = _ONE_ROW_OPTIONS if model.parallel.world_size == 1 else _INDUCTOR_OPTIONS
        self._one_row_step = torch.compile(_own_code(model.decode_forward), options=one_row_options)
        self._batched_step = torch.compile(_own_code(model.decode_forward), options=_INDUCTOR_OPTIONS)
        self._head = torch.compile(_own_code(model.local_logits), dynamic=False, options=_ONE_ROW_OPTIONS)
        self.head_captured = False

    @classmethod
    def for_model(cls, model: DeepseekForCausalLM, sizes: Sequence[int], device: torch.device) -> DecodeGraphs | None:
        """Graphs for ``model`` on ``device``, or None (logged) where they do not apply."""
        if not sizes:
            return None
        if device.type != "cpu":
            logger.info("decode graphs: CPU only for now; %s steps run eagerly", device.type)
            return None
        if model.parallel.data_parallel:
            logger.info("decode graphs: not with data-parallel attention; steps run eagerly")
            return None
        backend = model.kernel_backend
        if backend is not None and not trace_with(device.type, backend):
            logger.warning("decode graphs: another model in this process compiled its steps on another kernel "
                           "backend; steps run eagerly")
            return None
        return cls(model, sizes)

    def size_for(self, num_seqs: int) -> int | None:
        """The capture size a step of ``num_seqs`` decodes runs on (None: larger than every size)."""
        i = bisect.bisect_left(self.sizes, num_seqs)
        return self.sizes[i] if i < len(self.sizes) else None

    def run(self, batch: ForwardBatch, kv_cache: KVCache) -> torch.Tensor | None:
        """The step's final hidden states ``[T, hidden]``, or None when it is not one the graphs serve."""
        num_seqs = batch.num_seqs
        if batch.num_tokens != num_seqs or batch.dp_ranks is not None:
            return None
        size = self.size_for(num_seqs)
        if size is None or size not in self.captured:
            return None
        self.steps_run += 1
        return self._call(size, batch, kv_cache)[:num_seqs]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """``model.local_logits`` of one row ``hidden`` [1, hidden], compiled; None for more rows (they run
        eagerly: oneDNN's GEMM is as fast there)."""
        if hidden.shape[0] != 1 or not self.head_captured:
            return None
        return self._head(hidden)

    def capture(self, kv_cache: KVCache) -> float:
        """Compile and run every capture size once on a dummy step in the scratch block (largest first, as vLLM);
        returns the seconds it took."""
        start = time.perf_counter()
        # Dynamo reads ``freezing`` when it traces (the options above reach only Inductor): without it the weights
        # stay graph inputs, and every projection reorders its bf16 weight for oneDNN on each call.
        with torch._inductor.config.patch(freezing=True):
            for size in reversed(self.sizes):
                self._capture_size(size, kv_cache)
            if 1 in self.sizes:
                self._head(torch.zeros(1, self.model.config.hidden_size, dtype=self.model.dtype,
                                       device=self.model.inv_freq.device))
                self.head_captured = True
        return time.perf_counter() - start

    def _capture_size(self, size: int, kv_cache: KVCache) -> None:
        block_size, scratch = kv_cache.block_size, kv_cache.scratch_block
        device = self.model.inv_freq.device
        batch = ForwardBatch(
            input_ids=torch.zeros(size, dtype=torch.long, device=device),
            positions=torch.zeros(size, dtype=torch.long, device=device),
            query_start_loc=list(range(size + 1)),
            seq_lens=[1] * size,
            block_tables=torch.full((size, 1), scratch, dtype=torch.long, device=device),
            slot_mapping=torch.full((size,), scratch * block_size, dtype=torch.long, device=device),
        )
        self._call(size, batch, kv_cache)
        self.captured.add(size)

    def _call(self, size: int, batch: ForwardBatch, kv_cache: KVCache) -> torch.Tensor:
        """Run the compiled step on ``batch`` padded to ``size`` rows and to the context width the graph takes."""
        num_seqs = batch.num_seqs
        block_size = kv_cache.block_size
        scratch_slot = kv_cache.scratch_block * block_size
        width = max(max(batch.seq_lens), self.min_width)
        width = -(-width // CONTEXT_WIDTH_GRANULE) * CONTEXT_WIDTH_GRANULE
        # Context slot of every position < width of every sequence, block by block; positions past a sequence's
        # blocks repeat its last block (masked by its length, so any slot serves).
        tables = batch.block_tables
        num_blocks = -(-width // block_size)
        if tables.shape[1] < num_blocks:
            tables = torch.cat([tables, tables[:, -1:].expand(-1, num_blocks - tables.shape[1])], dim=1)
        offsets = torch.arange(block_size, device=tables.device)
        decode_slots = (tables[:, :num_blocks, None] * block_size + offsets).view(num_seqs, -1)[:, :width].contiguous()
        decode_lens = torch.tensor(batch.seq_lens, dtype=torch.long, device=tables.device)
        inputs = [batch.input_ids, batch.positions, batch.slot_mapping, decode_slots, decode_lens]
        if size > num_seqs:  # padding rows: token 0 at position 0, written to and reading the scratch block
            inputs = [_padded(tensor, size, fill) for tensor, fill in zip(inputs, (0, 0, scratch_slot, scratch_slot, 1),
                                                                           strict=True)]
        torch._dynamo.mark_dynamic(inputs[3], 1)
        if size > 1:
            for tensor in inputs:
                torch._dynamo.mark_dynamic(tensor, 0)
        # Data-dependent integers (a batch of one's expert ids, ``.tolist()``) stay in the graph as symbols instead
        # of breaking it; set at every call, since a call may trace (a new context width's graph). Set and restored
        # by hand: ``config.patch`` costs ~25 us a call.
        config = torch._dynamo.config
        previous, config.capture_scalar_outputs = config.capture_scalar_outputs, True
        try:
            return (self._one_row_step if size == 1 else self._batched_step)(*inputs, kv_cache)
        finally:
            config.capture_scalar_outputs = previous


def _own_code(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` bound to a copy of its code object. Dynamo keeps its compiled graphs per code object, at most
    ``recompile_limit`` (8) of them, then silently runs the function uncompiled: with one copy per model, every
    model in a process (the tests make dozens) keeps its own few graphs."""
    function = method.__func__
    code = function.__code__.replace()  # an equal code object, but a new one
    copy = types.FunctionType(code, function.__globals__, function.__name__, function.__defaults__,
                              function.__closure__)
    return types.MethodType(copy, method.__self__)


def _padded(values: torch.Tensor, size: int, fill: int) -> torch.Tensor:
    """``values`` ([n] or [n, w]) with rows ``n..size`` filled with ``fill``."""
    out = values.new_full((size, *values.shape[1:]), fill)
    out[:values.shape[0]] = values
    return out
