"""The one way the engine loads its model, in one process or as one rank's shard of it."""

from __future__ import annotations

import logging

import torch

from dsv32.config import TINY_PRESET, EngineConfig, ModelConfig
from dsv32.distributed.parallel import SINGLE_PROCESS, ParallelContext
from dsv32.kernels import select_backend, using_backend
from dsv32.model.deepseek import DeepseekForCausalLM
from dsv32.model.graphs import DecodeGraphs, capture_sizes
from dsv32.model.loader import load_model
from dsv32.model.quantize import weight_bytes

logger = logging.getLogger(__name__)


def load_engine_model(engine_config: EngineConfig, model_config: ModelConfig, device: torch.device,
                      parallel: ParallelContext = SINGLE_PROCESS) -> DeepseekForCausalLM:
    """The model (``parallel``: this rank's shard of it) as ``engine_config`` asks: the checkpoint in its load
    format, dtype and seed (the tiny preset: dummy weights), with the MTP layer when speculation drafts with it, on
    the configured kernel backend."""
    is_preset = engine_config.model == TINY_PRESET
    backend = select_backend(device.type, engine_config.kernel_backend)
    with using_backend(backend):  # integer weights are packed for the kernels of this backend's device
        model = load_model(model_config, None if is_preset else engine_config.model,
                           "dummy" if is_preset else engine_config.load_format, engine_config.dtype, device,
                           seed=engine_config.seed, with_mtp=engine_config.num_speculative_tokens > 0,
                           progress=parallel.rank == 0, parallel=parallel, quantization=engine_config.quantization)
    if parallel.rank == 0:
        logger.info("model weights: %.1f MiB (quantization: %s)", weight_bytes(model) / 2**20,
                    engine_config.weight_quantization(model_config) or "none")
    model.kernel_backend = backend
    if parallel.rank == 0:
        logger.info("kernel backend for %s: %s", device.type, model.kernel_backend.name)
    if not engine_config.enforce_eager:
        model.decode_graphs = DecodeGraphs.for_model(
            model, capture_sizes(engine_config.max_num_seqs, engine_config.cuda_graph_sizes), device)
    return model
