"""What load balancers ask a worker, beyond ``/health``, ``/v1/models`` and ``/metrics``: its load, its model and
its settings, in the shapes ``vllm-router`` and ``sglang-router`` read.

- ``GET /get_load``: ``{"load": N}``, the requests running plus waiting. vllm-router polls it for its power-of-two
  policy (it reads the integer ``load``) and shows it at its own ``GET /get_loads``.
- ``GET /get_model_info`` (also ``/model_info``): SGLang's fields (``model_path``, ``served_model_name``,
  ``is_generation``, ``max_context_length``, ...); sglang-router reads the model id of a worker from it.
- ``GET /get_server_info`` (also ``/server_info``): the serving settings under SGLang's names, plus ``version``.
- ``POST /flush_cache``: forget the prefix cache (the routers' ``/flush_cache`` calls it on every worker).
"""

from __future__ import annotations

from typing import Any

from dsv32.server.state import ServerState


def load(state: ServerState) -> dict[str, int]:
    stats = state.engine.stats()
    return {"load": stats.num_running + stats.num_waiting, "num_running_reqs": stats.num_running,
            "num_waiting_reqs": stats.num_waiting}


def model_info(state: ServerState) -> dict[str, Any]:
    config = state.config
    model_config = state.engine.model_config
    return {
        "model_path": config.model_path,
        "tokenizer_path": state.engine.engine_config.tokenizer or config.model_path,
        "served_model_name": config.model_name,
        "is_generation": True,
        "max_context_length": state.max_model_len,
        "vocab_size": model_config.vocab_size,
        "model_type": "deepseek_v32" if model_config.has_indexer else "deepseek_v3",
        "architectures": [model_config.architecture],
        "supports_vision": False,
        "preferred_sampling_params": None,
        "weight_version": "default",
    }


def server_info(state: ServerState, version: str) -> dict[str, Any]:
    engine_config = state.engine.engine_config
    return {
        "model_path": state.config.model_path,
        "tokenizer_path": engine_config.tokenizer or state.config.model_path,
        "served_model_name": state.config.model_name,
        "served_model_names": list(state.config.served_model_names),
        "context_length": state.max_model_len,
        "max_running_requests": engine_config.max_num_seqs,
        "max_num_batched_tokens": engine_config.max_num_batched_tokens,
        "page_size": engine_config.block_size,
        "kv_cache_dtype": engine_config.kv_cache_dtype,
        "quantization": engine_config.weight_quantization(state.engine.model_config),
        "weight_bytes": state.engine.stats().weight_bytes,
        "enable_prefix_caching": engine_config.enable_prefix_caching,
        "reasoning_parser": state.config.reasoning_parser,
        "tool_call_parser": state.config.tool_call_parser,
        # SGLang's meaning: tp_size counts every rank, dp_size the attention replicas among them.
        "tp_size": engine_config.world_size,
        "dp_size": engine_config.data_parallel_size,
        "ep_size": engine_config.world_size if engine_config.enable_expert_parallel else 1,
        "enable_dp_attention": engine_config.data_parallel_size > 1,
        "version": version,
    }
