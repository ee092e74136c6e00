"""The model's worker processes: which ranks this node runs, how they are started and stopped, and what each runs
(``run_worker``: join the world, load its shard, then ``serve_calls``, the driver's calls, until told to stop).

Every rank enters the same collectives in the same order; a rank with nothing of its own to do still runs every
step (there is no such thing as an idle rank). A worker that raises leaves its message in the store and exits.
``run_headless`` is a node that runs workers only (``--headless``, or a torchrun rank other than 0).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess

import torch

from dsv32.config import EngineConfig, ModelConfig
from dsv32.distributed.groups import (
    DEFAULT_MASTER_PORT,
    DistributedInitError,
    World,
    WorldSpec,
    device_backend,
    join_world,
    leave_world,
    loaded_barrier,
    torchrun_env,
)
from dsv32.distributed.parallel import ParallelContext
from dsv32.engine.executor.loading import load_engine_model
from dsv32.engine.executor.wire import HEARTBEAT, STOP, receive_call
from dsv32.engine.lifetime import become_child_of, spawn, threads_per_rank
from dsv32.model.cache import KVCache
from dsv32.model.deepseek import DeepseekForCausalLM

logger = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def world_specs(config: EngineConfig) -> list[WorldSpec]:
    """This node's ranks (from the flags, or this one rank under torchrun)."""
    world = config.world_size
    data_parallel = config.data_parallel_size > 1
    env = torchrun_env()
    if env is not None:
        if int(env["WORLD_SIZE"]) != world:
            raise DistributedInitError(f"torchrun started {env['WORLD_SIZE']} processes but the model runs over "
                                       f"{world} (--tensor-parallel-size x --data-parallel-size): they must match")
        return [WorldSpec(int(env["RANK"]), world, int(env["LOCAL_RANK"]), env["MASTER_ADDR"],
                          int(env["MASTER_PORT"]), data_parallel, config.enable_expert_parallel, 1, config.model,
                          config.distributed_timeout_s,
                          agent_store=os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True")]
    per_node = world // config.nnodes
    port = config.master_port or (DEFAULT_MASTER_PORT if config.nnodes > 1 else free_port())
    first = config.node_rank * per_node
    return [WorldSpec(first + i, world, i, config.master_addr, port, data_parallel, config.enable_expert_parallel,
                      config.nnodes, config.model, config.distributed_timeout_s) for i in range(per_node)]


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if device.type == "cuda" else device


@dataclass(frozen=True)
class WorkerArgs:
    """What a worker process needs to build its shard."""

    spec: WorldSpec
    engine_config: EngineConfig
    model_config: ModelConfig
    device: torch.device  # the node's device type; the rank takes its local index on CUDA
    threads: int
    log_level: int


def spawn_workers(specs: list[WorldSpec], engine_config: EngineConfig, model_config: ModelConfig,
                  device: torch.device, threads: int) -> list[BaseProcess]:
    """One worker process per spec, started now."""
    log_level = logging.getLogger().getEffectiveLevel()
    return [spawn(run_worker, (WorkerArgs(spec, engine_config, model_config, device, threads, log_level),),
                  f"dsv32-worker-{spec.rank}", engine_config.openmp_spin_count) for spec in specs]


def first_dead(workers: list[BaseProcess]) -> str | None:
    for process in workers:
        if process.exitcode is not None:
            return f"worker {process.name} exited with code {process.exitcode}"
    return None


def stop_all(workers: list[BaseProcess], grace_s: float = JOIN_TIMEOUT_S) -> None:
    """SIGTERM the workers and give them ``grace_s`` to exit, then SIGKILL (``grace_s`` 0: SIGKILL at once)."""
    for process in workers:
        if process.is_alive() and grace_s == 0:
            process.kill()
        elif process.is_alive():
            process.terminate()
    for process in workers:
        process.join(grace_s)
        if process.is_alive():
            process.kill()
            process.join()


def load_shard(world: World, engine_config: EngineConfig, model_config: ModelConfig,
               device: torch.device) -> DeepseekForCausalLM:
    """This rank's shard of the model (loaded, or dummy weights cut from the full draw)."""
    spec = world.spec
    parallel = ParallelContext(spec.rank, spec.world_size, spec.expert_parallel, world.compute, spec.data_parallel)
    return load_engine_model(engine_config, model_config, device, parallel)


def run_headless(engine_config: EngineConfig, model_config: ModelConfig, device: torch.device) -> int:
    """A node that only runs workers (``--headless``): start its ranks and wait for them; exit with the first
    failure's code. SIGTERM / Ctrl-C stop them. Under torchrun (a rank other than 0) this process is the worker."""
    specs = world_specs(engine_config)
    if specs[0].rank == 0:
        raise DistributedInitError("--headless on node 0: node 0 runs the driver (the API server); give the worker "
                                   "nodes --node-rank 1 and up")
    threads = threads_per_rank(len(specs))
    if torchrun_env() is not None:
        become_child_of(os.getppid())
        run_worker(WorkerArgs(specs[0], engine_config, model_config, device, threads,
                              logging.getLogger().getEffectiveLevel()))
        return 0
    workers = spawn_workers(specs, engine_config, model_config, device, threads)
    logger.info("headless node %d: started ranks %s", engine_config.node_rank, [s.rank for s in specs])

    def stop(signum: int, frame: object) -> None:
        stop_all(workers)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    running = {process.sentinel: process for process in workers}
    while running:  # the first worker to fail stops the others (they may be waiting on it)
        for sentinel in wait(list(running)):
            process = running.pop(sentinel)
            process.join()
            if process.exitcode:
                stop_all(workers)
                return 1
    return 0


def run_worker(args: WorkerArgs) -> None:
    """A worker's life: join, load this rank's shard, follow the driver until it stops."""
    logging.basicConfig(level=args.log_level,
                        format=f"%(asctime)s %(levelname)s (worker rank {args.spec.rank} pid %(process)d) "
                               "%(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    device = rank_device(args.device, args.spec.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        world = join_world(args.spec, device_backend(device))
    except DistributedInitError as exc:
        logger.error("%s", exc)
        os._exit(1)
    try:
        model = load_shard(world, args.engine_config, args.model_config, device)
        loaded_barrier(world)
        serve_calls(world, model, device)
    except Exception as exc:
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        world.report_failure(message)
        logger.error("worker rank %d failed: %s", args.spec.rank, message)
        os._exit(1)
    leave_world()


def serve_calls(world: World, model: DeepseekForCausalLM, device: torch.device) -> None:
    """Run every call the driver broadcasts, until it says stop (a cache the driver dropped is released here with
    the call after)."""
    caches: dict[int, KVCache] = {}
    while True:
        header, cache_id, args = receive_call(world, device, caches)
        for released in header.released_caches:
            caches.pop(released, None)
        if header.method == STOP:
            return
        if header.method == HEARTBEAT:
            continue
        with torch.inference_mode():
            if header.method == "allocate_kv_cache":
                assert cache_id is not None
                caches[cache_id] = model.allocate_kv_cache(*args)
            else:
                getattr(model, header.method)(*args)
