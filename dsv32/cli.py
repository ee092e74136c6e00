"""The ``dsv32`` console script: ``serve`` (the OpenAI-compatible server), ``run-batch`` (a file of OpenAI batch
requests through the engine), ``chat`` (a terminal client for a server),
``bench serve`` (load generator) and ``eval gsm8k`` (accuracy against a running server).

Flags follow vLLM's names so its launch commands carry over; the heavy modules (torch, the engine, the benchmark)
are imported only by the subcommand that needs them, so ``dsv32 --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from dsv32.config import (
    DEVICES,
    DISTRIBUTED_EXECUTOR_BACKENDS,
    DTYPES,
    ENFORCE_EAGER_ENV,
    KERNEL_BACKEND_ENV,
    KERNEL_BACKENDS,
    KV_CACHE_DTYPES,
    LOAD_FORMATS,
    QUANTIZATION_METHODS,
    TINY_PRESET,
    ConfigError,
    EngineConfig,
    ModelConfig,
    SpeculativeConfig,
    StructuredOutputsConfig,
)
from dsv32.server.settings import REASONING_PARSERS, TOOL_CALL_PARSERS, RequestLimits, ServerConfig

API_KEY_ENV = "DSV32_API_KEY"
# A model with random weights never says EOS on purpose: without a limit it would generate to the end of the context.
DUMMY_DEFAULT_MAX_TOKENS = 256

logger = logging.getLogger("dsv32")


def _positive_int(text: str) -> int:
    value = _int_with_suffix(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    value = _int_with_suffix(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return value


def _int_with_suffix(text: str) -> int:
    """Integers, also written as vLLM allows for lengths: ``32k`` (x1000), ``32K`` (x1024), ``1m``/``1M``."""
    scale = {"k": 1000, "K": 1024, "m": 1_000_000, "M": 1024 * 1024}
    try:
        if text and text[-1] in scale:
            return int(float(text[:-1]) * scale[text[-1]])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer (optionally with k/K/m/M), got {text!r}") from None


_MODEL_HELP = ("Hugging Face checkpoint folder of a DeepSeek-V3.2 (or V3/V3.1/R1) model; 'demo' (default): the "
               "packaged small V3.2 trained by `dsv32 train-demo` (arithmetic with thinking, tool calls, JSON); "
               "'tiny': a built-in toy model of the same architecture with random weights (tests, benchmarks).")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """``dsv32 serve``'s flags; every default is the config dataclasses' own (``EngineConfig``, ``ServerConfig``)."""
    server = ServerConfig()
    parser.add_argument("model", nargs="?", default=EngineConfig().model, help=_MODEL_HELP)
    net = parser.add_argument_group("HTTP")
    net.add_argument("--host", default=server.host,
                     help=f"Address to bind (default {server.host}; 0.0.0.0 for all).")
    net.add_argument("--port", type=int, default=server.port, help=f"Port to listen on (default {server.port}).")
    net.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                     help=f"Require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV}, else none).")
    net.add_argument("--shutdown-timeout", type=float, default=server.shutdown_timeout,
                     help="On SIGTERM, seconds to let in-flight requests finish before aborting them (default "
                          f"{server.shutdown_timeout:g}).")
    net.add_argument("--max-request-bytes", type=_positive_int, default=server.limits.max_request_bytes,
                     help="Largest request body accepted; a larger one is a 413 (default "
                          f"{server.limits.max_request_bytes}, 32M).")
    net.add_argument("--max-json-depth", type=_positive_int, default=server.limits.max_json_depth,
                     help="Deepest nesting of a JSON request body, and of JSON inside its strings (tool arguments, "
                          f"schemas); deeper is a 400 (default {server.limits.max_json_depth}).")
    net.add_argument("--max-stored-responses", type=_non_negative_int, default=server.max_stored_responses,
                     metavar="N", help="Responses (/v1/responses, store=true) kept in memory for retrieval and "
                     f"previous_response_id; the oldest are dropped first (default {server.max_stored_responses}; 0 "
                     "keeps none).")
    net.add_argument("--uvicorn-log-level", default=server.uvicorn_log_level,
                     choices=["critical", "error", "warning", "info", "debug", "trace"],
                     help=f"Log level of uvicorn's own messages (default {server.uvicorn_log_level}).")
    add_api_arguments(parser.add_argument_group("API"))
    add_engine_arguments(parser.add_argument_group("engine"))
    add_parallel_arguments(parser.add_argument_group("parallelism (one model over several processes / machines)"))


def add_api_arguments(api: argparse._ArgumentGroup) -> None:
    """How requests are answered: shared by `serve` and `run-batch` (defaults: ``ServerConfig``'s)."""
    server = ServerConfig()
    api.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                     help="Name(s) the API answers to; the first is reported in responses (default: the model path).")
    api.add_argument("--reasoning-parser", default=server.reasoning_parser, choices=sorted(REASONING_PARSERS),
                     help="Split the model's thinking into `reasoning` / `reasoning_content` (default "
                          f"{server.reasoning_parser}; 'none' leaves it in `content`).")
    api.add_argument("--tool-call-parser", default=server.tool_call_parser, choices=sorted(TOOL_CALL_PARSERS),
                     help=f"Parse DSML tool calls into `tool_calls` (default {server.tool_call_parser}; 'none' "
                          "disables tools).")
    api.add_argument("--enable-auto-tool-choice", action="store_true",
                     help="Accepted for vLLM command compatibility: `tool_choice: auto` is on whenever a tool-call "
                          "parser is set.")
    api.add_argument("--default-max-tokens", type=_positive_int, default=None, metavar="N",
                     help="Tokens a request that sets no max_tokens may generate (default: what the context has "
                          f"left, as vLLM; {DUMMY_DEFAULT_MAX_TOKENS} for a model with random weights).")
    api.add_argument("--log-requests", action="store_true",
                     help="Log each request's prompt and sampling parameters (off by default: prompts can be private).")


def add_engine_arguments(eng: argparse._ArgumentGroup) -> None:
    """The engine's flags (vLLM's names): shared by `serve` and `run-batch` (defaults: ``EngineConfig``'s)."""
    engine = EngineConfig()
    eng.add_argument("--tokenizer", default=engine.tokenizer,
                     help="Tokenizer folder or tokenizer.json (default: the model's).")
    eng.add_argument("--tokenizer-mode", default="deepseek_v32", choices=["auto", "deepseek_v32"],
                     help="Accepted for vLLM command compatibility; the V3.2 encoding is always used.")
    eng.add_argument("--trust-remote-code", action="store_true",
                     help="Accepted for vLLM/SGLang command compatibility; no remote code is ever run.")
    eng.add_argument("--dtype", default=engine.dtype, choices=DTYPES,
                     help=f"Weight/activation dtype (default {engine.dtype}).")
    eng.add_argument("--load-format", default=engine.load_format, choices=LOAD_FORMATS,
                     help="'dummy' initialises random weights (auto = safetensors for a checkpoint, dummy for tiny).")
    eng.add_argument("--max-model-len", type=_positive_int, default=engine.max_model_len,
                     help="Context length (prompt + output) in tokens, e.g. 8192 or 32k (default: the model's).")
    eng.add_argument("--max-num-seqs", type=_positive_int, default=engine.max_num_seqs,
                     help=f"Most requests running in one batch (default {engine.max_num_seqs}).")
    eng.add_argument("--max-num-batched-tokens", type=_positive_int, default=engine.max_num_batched_tokens,
                     help="Token budget of one engine step; longer prompts are prefilled in chunks (default "
                          f"{engine.max_num_batched_tokens}).")
    eng.add_argument("--max-waiting-requests", type=_positive_int, default=engine.max_waiting_requests,
                     help="Requests allowed to wait for a batch slot; beyond that the server answers 503 (default "
                          f"{engine.max_waiting_requests}).")
    eng.add_argument("--engine-step-timeout", type=float, default=engine.engine_step_timeout_s, metavar="SECONDS",
                     help="A busy engine that reports no step for this long is hung: requests in flight fail with "
                          f"503 and /health answers 503 (default {engine.engine_step_timeout_s:g}).")
    eng.add_argument("--max-logprobs", type=int, default=engine.max_logprobs,
                     help="Most top alternatives a request may ask for with logprobs/top_logprobs/prompt_logprobs "
                          f"(default {engine.max_logprobs}).")
    eng.add_argument("--block-size", type=_positive_int, default=engine.block_size,
                     help=f"KV-cache block size in tokens (default {engine.block_size}).")
    eng.add_argument("--kv-cache-dtype", default=engine.kv_cache_dtype, choices=KV_CACHE_DTYPES,
                     help=f"KV-cache storage dtype: auto (model dtype) or fp8 (default {engine.kv_cache_dtype}).")
    eng.add_argument("--quantization", "-q", default=engine.quantization, choices=QUANTIZATION_METHODS,
                     help="Weights: int8 (per output channel) or int4 (groups of 128) quantised online at load, "
                          "weight-only; or the checkpoint's own format to insist on it (default: as config.json's "
                          "quantization_config says).")
    eng.add_argument("--kv-cache-memory-bytes", type=_positive_int, default=engine.kv_cache_memory,
                     help="Bytes for the KV cache (default: from --gpu-memory-utilization, or a CPU default).")
    eng.add_argument("--gpu-memory-utilization", type=float, default=engine.gpu_memory_utilization,
                     help="Fraction of GPU memory the engine may use, KV cache included (default "
                          f"{engine.gpu_memory_utilization}).")
    eng.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                     default=engine.enable_prefix_caching,
                     help="Reuse the KV cache of shared prompt prefixes (default "
                          f"{'on' if engine.enable_prefix_caching else 'off'}).")
    eng.add_argument("--seed", type=int, default=engine.seed,
                     help=f"Seed for weight init (dummy) and sampling (default {engine.seed}).")
    eng.add_argument("--device", default=engine.device, choices=DEVICES,
                     help="Where the model runs (default: cuda if available, else cpu).")
    eng.add_argument("--kernel-backend", default=engine.kernel_backend, choices=KERNEL_BACKENDS,
                     help=f"The model's kernels: auto (Triton on CUDA, else torch), torch or triton (default: "
                          f"${KERNEL_BACKEND_ENV}, else auto).")
    eng.add_argument("--openmp-spin-count", type=int, default=engine.openmp_spin_count, metavar="N",
                     help="GOMP_SPINCOUNT of the engine's processes (default: $GOMP_SPINCOUNT if set, else 20000000: "
                          "the model's threads stay hot between a step's parallel regions).")
    eng.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=engine.enforce_eager,
                     help="Run every step eagerly: no compiled decode graphs (default: off, unless "
                          f"${ENFORCE_EAGER_ENV} is 1). Off, decode steps of up to the largest --cuda-graph-sizes "
                          "sequences run as graphs compiled at start-up.")
    eng.add_argument("--cuda-graph-sizes", type=int, nargs="+", default=None, metavar="N",
                     help="Decode batch sizes to capture (compiled graphs on CPU); a step runs on the smallest size "
                          "that holds it (default: 1 2 4 8 16 24 32 48 64 ... up to --max-num-seqs).")
    eng.add_argument("--structured-outputs-config", default="{}", metavar="JSON",
                     help='Structured outputs (JSON schema, regex, choice, grammar, constrained tool calls), as a JSON '
                          'object: {"backend": "xgrammar", "max_whitespace": 16} (the defaults; backend "auto" = '
                          'xgrammar).')

    # Speculative decoding: the checkpoint's MTP layer drafts.
    eng.add_argument("--speculative-config", default=None, metavar="JSON",
                     help='vLLM\'s form, e.g. \'{"method": "mtp", "num_speculative_tokens": 2}\' (deepseek_mtp is an '
                          "alias of mtp).")
    eng.add_argument("--speculative-algorithm", default=None, metavar="EAGLE|NEXTN",
                     help="SGLang's form: EAGLE or NEXTN, with --speculative-num-steps.")
    eng.add_argument("--speculative-num-steps", type=_positive_int, default=None,
                     help="SGLang: number of drafted tokens per step.")
    eng.add_argument("--speculative-eagle-topk", type=_positive_int, default=None,
                     help="SGLang: must be 1 (a chain of drafts, no tree).")
    eng.add_argument("--speculative-num-draft-tokens", type=_positive_int, default=None,
                     help="SGLang: --speculative-num-steps + 1 with top-k 1.")


def add_parallel_arguments(par: argparse._ArgumentGroup) -> None:
    """vLLM's flags, with SGLang's names as aliases."""
    engine = EngineConfig()
    par.add_argument("-tp", "--tensor-parallel-size", "--tp", "--tp-size", dest="tensor_parallel_size",
                     type=_positive_int, default=engine.tensor_parallel_size,
                     help="Ranks (devices) the model is split over: attention by head, dense layers and experts by "
                          "their intermediate size, vocabulary by rows.")
    par.add_argument("--enable-expert-parallel", "-ep", action="store_true", default=engine.enable_expert_parallel,
                     help="Split the routed experts by expert (n_routed_experts / tp whole experts per rank) instead "
                          "of cutting every expert.")
    par.add_argument("--ep", "--ep-size", "--expert-parallel-size", dest="ep_size", type=_positive_int, default=None,
                     help="SGLang: expert-parallel size; equal to --tp it means --enable-expert-parallel.")
    par.add_argument("--distributed-executor-backend", default=engine.distributed_executor_backend,
                     choices=DISTRIBUTED_EXECUTOR_BACKENDS,
                     help="mp: this process spawns the node's other ranks (torchrun's environment is used when set).")
    par.add_argument("--nnodes", type=_positive_int, default=engine.nnodes, help="Machines the ranks span.")
    par.add_argument("--node-rank", type=int, default=engine.node_rank,
                     help="This machine's index (0 runs the API server and the driver).")
    par.add_argument("--master-addr", default=None, help=f"Address of node 0 (default {engine.master_addr}).")
    par.add_argument("--master-port", type=int, default=None,
                     help="Port where the ranks meet on node 0 (default: a free port on one node, 29500 across "
                          "nodes).")
    par.add_argument("--dist-init-addr", default=None, metavar="HOST:PORT",
                     help="SGLang: --master-addr and --master-port in one.")
    par.add_argument("--headless", action="store_true",
                     help="Run only this node's model workers (no API server): the nodes other than node 0 (implied by "
                          "--node-rank above 0).")
    par.add_argument("--distributed-timeout", type=float, default=engine.distributed_timeout_s, metavar="SECONDS",
                     help="How long the ranks wait for each other (start-up, and any one collective) before failing.")
    par.add_argument("--data-parallel-size", "-dp", "--dp", "--dp-size", dest="data_parallel_size",
                     type=_positive_int, default=engine.data_parallel_size,
                     help="Data-parallel attention ranks: attention replicated, each rank its own requests and KV "
                          "cache, the MoE shared by all ranks (with --enable-expert-parallel: experts split by "
                          "expert). SGLang's --tp N --dp N --enable-dp-attention is the same layout.")
    par.add_argument("--enable-dp-attention", action="store_true",
                     help="SGLang: with --tp N --dp N, data-parallel attention over N ranks.")


def parallel_config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The ``EngineConfig`` fields of the parallelism flags (SGLang's aliases folded into vLLM's)."""
    tp, dp = args.tensor_parallel_size, args.data_parallel_size
    if args.enable_dp_attention:
        # SGLang: --tp is every rank, --dp the attention replicas among them; one replica per rank is supported.
        if dp != tp:
            raise ConfigError(f"--enable-dp-attention with --tp {tp} --dp {dp}: only --dp equal to --tp (one "
                              "attention replica per rank) is supported")
        tp = 1
    elif dp > 1 and tp > 1:
        raise ConfigError(f"--data-parallel-size {dp} with --tensor-parallel-size {tp}: give one of them (SGLang's "
                          "--tp N --dp N needs --enable-dp-attention)")
    expert_parallel = args.enable_expert_parallel
    if args.ep_size is not None and args.ep_size > 1:
        if args.ep_size != tp * dp:
            raise ConfigError(f"--ep {args.ep_size}: expert parallelism spans every rank, so it must equal the "
                              f"number of ranks ({tp * dp})")
        expert_parallel = True
    master_addr, master_port = args.master_addr, args.master_port
    if args.dist_init_addr is not None:
        if master_addr is not None or master_port is not None:
            raise ConfigError("--dist-init-addr and --master-addr/--master-port are alternatives; give one")
        host, sep, port = args.dist_init_addr.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(f"--dist-init-addr {args.dist_init_addr!r}: expected HOST:PORT")
        master_addr, master_port = host.strip("[]"), int(port)
    return {"tensor_parallel_size": tp, "data_parallel_size": dp, "enable_expert_parallel": expert_parallel,
            "distributed_executor_backend": args.distributed_executor_backend, "nnodes": args.nnodes,
            "node_rank": args.node_rank, "master_addr": master_addr or EngineConfig().master_addr,
            "master_port": master_port, "distributed_timeout_s": args.distributed_timeout}


def speculative_config_from_args(args: argparse.Namespace) -> SpeculativeConfig | None:
    """vLLM's ``--speculative-config`` or SGLang's ``--speculative-*`` flags (not both)."""
    sglang = (args.speculative_num_steps, args.speculative_eagle_topk, args.speculative_num_draft_tokens)
    if args.speculative_config is not None:
        if args.speculative_algorithm is not None or any(v is not None for v in sglang):
            raise ConfigError("--speculative-config and SGLang's --speculative-* flags are alternatives; give one")
        return SpeculativeConfig.from_json(args.speculative_config)
    if args.speculative_algorithm is None:
        if any(v is not None for v in sglang):
            raise ConfigError("--speculative-num-steps/--speculative-eagle-topk/--speculative-num-draft-tokens need "
                              "--speculative-algorithm EAGLE (or NEXTN)")
        return None
    return SpeculativeConfig.from_sglang(args.speculative_algorithm, *sglang)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        tokenizer=args.tokenizer,
        served_model_name=args.served_model_name[0] if args.served_model_name else None,
        dtype=args.dtype,
        load_format=args.load_format,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        kv_cache_dtype=args.kv_cache_dtype,
        quantization=args.quantization,
        kv_cache_memory=args.kv_cache_memory_bytes,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=args.enable_prefix_caching,
        seed=args.seed,
        device=args.device,
        max_waiting_requests=args.max_waiting_requests,
        engine_step_timeout_s=args.engine_step_timeout,
        max_logprobs=args.max_logprobs,
        kernel_backend=args.kernel_backend,
        openmp_spin_count=args.openmp_spin_count,
        enforce_eager=args.enforce_eager,
        cuda_graph_sizes=args.cuda_graph_sizes,
        structured_outputs_config=StructuredOutputsConfig.from_json(args.structured_outputs_config),
        speculative_config=speculative_config_from_args(args),
        **(parallel_config_from_args(args) if hasattr(args, "tensor_parallel_size") else {}),
    )


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    # The HTTP flags exist for `serve` only (`run-batch` has no server).
    http = {key: getattr(args, key) for key in ("host", "port", "shutdown_timeout", "uvicorn_log_level",
                                               "max_stored_responses") if hasattr(args, key)}
    if hasattr(args, "max_request_bytes"):
        http["limits"] = RequestLimits(max_request_bytes=args.max_request_bytes, max_json_depth=args.max_json_depth)
    random_weights = args.model == TINY_PRESET or args.load_format == "dummy"
    return ServerConfig(
        served_model_names=tuple(args.served_model_name or [args.model]),
        model_path=args.model,
        **http,
        api_key=args.api_key or None,
        reasoning_parser=args.reasoning_parser,
        tool_call_parser=args.tool_call_parser,
        log_requests=args.log_requests,
        default_max_tokens=args.default_max_tokens or (DUMMY_DEFAULT_MAX_TOKENS if random_weights else None),
    )


def configs_from_args(args: argparse.Namespace, command: str) -> tuple[EngineConfig, ServerConfig] | None:
    """The engine and server configs of ``serve`` / ``run-batch``; None (after a one-line error) when invalid."""
    try:
        return engine_config_from_args(args), server_config_from_args(args)
    except (ConfigError, ValueError) as exc:
        print(f"dsv32 {command}: error: {exc}", file=sys.stderr)
        return None


def run_serve(args: argparse.Namespace) -> int:
    if (configs := configs_from_args(args, "serve")) is None:
        return 2
    engine_config, server_config = configs
    # Only node 0 serves: another node runs its workers, with or without --headless (SGLang has no such flag).
    if args.headless or engine_config.node_rank > 0 or _is_torchrun_worker():
        return run_workers(engine_config)
    from dsv32.server.launcher import serve

    return serve(engine_config, server_config)


def _is_torchrun_worker() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("RANK", "0") != "0"


def run_workers(engine_config: EngineConfig) -> int:
    """``serve --headless`` (a node that only runs model workers) or a torchrun rank other than 0."""
    from dsv32.distributed.groups import DistributedInitError
    from dsv32.engine.executor.worker import run_headless
    from dsv32.engine.runner import resolve_device

    try:
        return run_headless(engine_config, ModelConfig.from_pretrained(engine_config.model),
                            resolve_device(engine_config.device))
    except (ConfigError, DistributedInitError) as exc:
        print(f"dsv32 serve: error: {exc}", file=sys.stderr)
        return 2


def add_run_batch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-i", "--input-file", required=True,
                        help="JSONL of OpenAI batch requests: {custom_id, method, url, body} per line, url "
                             "/v1/chat/completions or /v1/completions.")
    parser.add_argument("-o", "--output-file", required=True,
                        help="JSONL of results, one per request in input order. If it exists, the custom_ids already "
                             "done there are skipped (resume).")
    parser.add_argument("--model", default=EngineConfig().model, help=_MODEL_HELP)
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="No progress bar.")
    add_api_arguments(parser.add_argument_group("API"))
    add_engine_arguments(parser.add_argument_group("engine"))
    parser.set_defaults(api_key=None)


def run_run_batch(args: argparse.Namespace) -> int:
    if (configs := configs_from_args(args, "run-batch")) is None:
        return 2
    engine_config, server_config = configs
    from dsv32.server.run_batch import run_batch_file

    return run_batch_file(engine_config, server_config, args.input_file, args.output_file, progress=args.progress)


def run_chat(args: argparse.Namespace) -> int:
    from dsv32.client.chat import run_chat_client

    return run_chat_client(args)


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000",
                        help="Base URL of a running `dsv32 serve` (or any OpenAI-compatible server).")
    parser.add_argument("--model", default=None, help="Model name to ask for (default: the server's first model).")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), help=f"Bearer key (default ${API_KEY_ENV}).")
    parser.add_argument("--system", default=None, help="A system prompt for the conversation.")
    parser.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=False,
                        help="Ask the model to think first; its thinking is shown apart from the answer (default off, "
                             "as the server's; /thinking on switches it on).")
    parser.add_argument("--max-tokens", type=_positive_int, default=256, help="Most tokens per answer (default 256).")
    parser.add_argument("--temperature", type=float, default=None, help="Sampling temperature (server default).")
    parser.add_argument("--top-p", type=float, default=None, help="Nucleus sampling mass (server default).")


# Subcommands written in other modules, imported only when chosen: (group, name, module, add-arguments, run).
_EXTERNAL_SUBCOMMANDS = (
    ("bench", "serve", "dsv32.bench.serve", "add_bench_serve_arguments", "run_bench_serve",
     "Benchmark a running OpenAI-compatible server (vllm bench serve's metrics)."),
    ("eval", "gsm8k", "dsv32.eval.gsm8k", "add_eval_gsm8k_arguments", "run_eval_gsm8k",
     "GSM8K accuracy of a running server."),
    ("eval", "demo", "dsv32.eval.demo", "add_eval_demo_arguments", "run_eval_demo",
     "Held-out accuracy of the demo model's skills (arithmetic, tool calls, JSON) on a running server."),
)
# Top-level subcommands written in other modules: (name, module, add-arguments, run, help).
_EXTERNAL_COMMANDS = (
    ("train-demo", "dsv32.train.demo", "add_train_demo_arguments", "run_train_demo",
     "Train the small DeepSeek-V3.2 demo model on CPU (synthetic corpus) and export it as an HF checkpoint."),
)


def _add_external(group_parser: argparse.ArgumentParser, group: str, chosen: Sequence[str]) -> None:
    subparsers = group_parser.add_subparsers(dest=f"{group}_command", metavar="COMMAND", required=True)
    for grp, name, module_name, add_name, run_name, help_text in _EXTERNAL_SUBCOMMANDS:
        if grp != group:
            continue
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        # Import the (numpy/tqdm-heavy) module only when this very subcommand is on the command line.
        if list(chosen[:2]) == [group, name]:
            try:
                module = importlib.import_module(module_name)
            except ImportError as exc:
                group_parser.error(f"'{group} {name}' is not available in this installation: {exc}")
            getattr(module, add_name)(sub)
            sub.set_defaults(handler=getattr(module, run_name))


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsv32",
        description="DeepSeek-V3.2 inference engine with an OpenAI-compatible server.",
        epilog="Examples:\n  dsv32 serve                      # the packaged demo model on 127.0.0.1:8000\n"
               "  dsv32 serve /models/DeepSeek-V3.2 --max-model-len 32k\n"
               "  dsv32 chat --url http://127.0.0.1:8000\n"
               "  dsv32 run-batch -i requests.jsonl -o results.jsonl --model /models/DeepSeek-V3.2\n"
               "  dsv32 bench serve --num-prompts 100\n  dsv32 eval gsm8k\n  dsv32 eval demo --num-prompts 50\n"
               "  dsv32 train-demo --minutes 90",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = subparsers.add_parser("serve", help="Run the OpenAI-compatible HTTP server.",
                                  description="Run the OpenAI-compatible HTTP server (vLLM's flag names).")
    add_serve_arguments(serve)
    serve.set_defaults(handler=run_serve)

    run_batch = subparsers.add_parser(
        "run-batch", help="Run a file of OpenAI batch requests through the engine (vllm run-batch's format).",
        description="Run a JSONL file of OpenAI batch requests through the engine at full batch; results are written "
                    "in input order, and a rerun with the same output file skips the requests already done.")
    add_run_batch_arguments(run_batch)
    run_batch.set_defaults(handler=run_run_batch)

    chat = subparsers.add_parser("chat", help="Chat with a running server in the terminal.",
                                 description="Interactive chat against a running server; the model's thinking is "
                                             "shown apart from its answer. Type /help in the chat for commands.")
    add_chat_arguments(chat)
    chat.set_defaults(handler=run_chat)

    bench = subparsers.add_parser("bench", help="Benchmarks (bench serve).", description="Benchmarks.")
    _add_external(bench, "bench", argv)
    evaluate = subparsers.add_parser("eval", help="Accuracy evaluations (eval gsm8k).",
                                     description="Accuracy evaluations.")
    _add_external(evaluate, "eval", argv)
    for name, module_name, add_name, run_name, help_text in _EXTERNAL_COMMANDS:
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if list(argv[:1]) == [name]:  # torch is imported only when this command runs
            module = importlib.import_module(module_name)
            getattr(module, add_name)(sub)
            sub.set_defaults(handler=getattr(module, run_name))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request at INFO: noise in the chat client, the benchmark and the eval.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
