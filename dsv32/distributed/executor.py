"""Driver and workers: one model over ``world_size`` ranks, with the engine's scheduler on rank 0 alone.

The driver (rank 0: the engine-core process, or the offline ``LLM``'s process) holds a ``DistributedModel``: it
looks like the model to the runner, and every call the runner makes on it (``forward``, ``compute_logits``, the MTP
calls, KV-cache allocation) is first broadcast to the workers, then run on the driver's own shard. Each worker runs
``serve_calls``: it receives the call and runs it on its shard, so every rank enters the same collectives in the
same order; a rank with nothing of its own to do still runs every step (there is no such thing as an idle rank).
The driver alone samples (logits are gathered to every rank; the workers drop them).

A call crosses as a small pickled header on the CPU (``control`` group: method, shapes, non-tensor arguments)
followed by its tensors broadcast on the ``compute`` group (the device's own transport), as vLLM's
``broadcast_tensor_dict`` does. KV caches are named by an id; a cache the driver drops is released on the workers
with the next call.

Processes: ``start_driver`` spawns this node's other ranks (``--distributed-executor-backend mp``), joins the world,
loads its shard and waits until every rank has loaded; on other nodes ``run_headless`` spawns that node's ranks and
waits for them. Local workers die with the process that started them (``PR_SET_PDEATHSIG``); remote ones when the
driver's sockets close. Faults end everything: a worker that raises leaves its message in the store and exits; the
driver's next collective fails (at once when the peer's sockets close, else after ``collective_timeout_s``) and
raises ``WorkerFailure``, which the engine does not survive; a local worker that dies while the driver is idle is
seen by a watcher thread, which calls ``on_worker_death``.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

import torch
import torch.distributed as dist

from dsv32.config import TINY_PRESET, EngineConfig, ModelConfig
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
from dsv32.distributed.lifetime import die_with_parent, tune_openmp_spin
from dsv32.distributed.parallel import ParallelContext, validate_layout

logger = logging.getLogger(__name__)

_STOP = "__stop__"
_HEARTBEAT = "__heartbeat__"
_JOIN_TIMEOUT_S = 10.0


class WorkerFailure(RuntimeError):
    """A rank of the model failed or vanished: the engine cannot continue (every process is being stopped)."""


# ---- the launch --------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def world_specs(config: EngineConfig, model_name: str) -> list[WorldSpec]:
    """This node's ranks (from the flags, or this one rank under torchrun)."""
    world = config.world_size
    data_parallel = config.data_parallel_size > 1
    env = torchrun_env()
    if env is not None:
        if int(env["WORLD_SIZE"]) != world:
            raise DistributedInitError(f"torchrun started {env['WORLD_SIZE']} processes but the model runs over "
                                       f"{world} (--tensor-parallel-size x --data-parallel-size): they must match")
        return [WorldSpec(int(env["RANK"]), world, int(env["LOCAL_RANK"]), env["MASTER_ADDR"],
                          int(env["MASTER_PORT"]), data_parallel, config.enable_expert_parallel, 1, model_name,
                          config.distributed_timeout_s,
                          agent_store=os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True")]
    per_node = world // config.nnodes
    port = config.master_port or (DEFAULT_MASTER_PORT if config.nnodes > 1 else free_port())
    first = config.node_rank * per_node
    return [WorldSpec(first + i, world, i, config.master_addr, port, data_parallel, config.enable_expert_parallel,
                      config.nnodes, model_name, config.distributed_timeout_s) for i in range(per_node)]


@dataclass(frozen=True)
class WorkerArgs:
    """What a worker process needs to build its shard."""

    spec: WorldSpec
    engine_config: EngineConfig
    model_config: ModelConfig
    device: torch.device  # the node's device type; the rank takes its local index on CUDA
    with_mtp: bool
    threads: int
    parent_pid: int
    log_level: int


def _spawn_workers(specs: list[WorldSpec], engine_config: EngineConfig, model_config: ModelConfig,
                   device: torch.device, with_mtp: bool, threads: int) -> list[BaseProcess]:
    context = multiprocessing.get_context("spawn")
    tune_openmp_spin()  # inherited by the workers, whose torch loads after it
    processes = []
    for spec in specs:
        args = WorkerArgs(spec, engine_config, model_config, device, with_mtp, threads, os.getpid(),
                          logging.getLogger().getEffectiveLevel())
        process = context.Process(target=run_worker, args=(args,), name=f"dsv32-worker-{spec.rank}", daemon=False)
        process.start()
        processes.append(process)
    return processes


def threads_per_rank(local_ranks: int) -> int:
    """This node's cores split between its ranks (``OMP_NUM_THREADS`` wins)."""
    if "OMP_NUM_THREADS" in os.environ:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // local_ranks)


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if device.type == "cuda" else device


def build_shard(world: World, engine_config: EngineConfig, model_config: ModelConfig, device: torch.device,
                with_mtp: bool) -> torch.nn.Module:
    """This rank's shard of the model (loaded, or dummy weights cut from the full draw)."""
    from dsv32.model.loader import load_model

    spec = world.spec
    parallel = ParallelContext(spec.rank, spec.world_size, spec.expert_parallel, world.compute, spec.data_parallel)
    is_preset = engine_config.model == TINY_PRESET
    return load_model(model_config, None if is_preset else engine_config.model,
                      "dummy" if is_preset else engine_config.load_format, engine_config.dtype, device,
                      seed=engine_config.seed, with_mtp=with_mtp, progress=spec.rank == 0, parallel=parallel)


def start_driver(engine_config: EngineConfig, model_config: ModelConfig, device: torch.device, with_mtp: bool,
                 on_worker_death: Callable[[str], None] | None = None) -> DistributedModel:
    """Rank 0: start this node's workers, meet the other ranks, load the driver's shard, wait for every rank."""
    validate_layout(model_config, engine_config.world_size, engine_config.enable_expert_parallel,
                    fp8_weights=engine_config.model != TINY_PRESET and engine_config.load_format != "dummy",
                    data_parallel=engine_config.data_parallel_size > 1)
    specs = world_specs(engine_config, engine_config.model)
    if specs[0].rank != 0:
        raise DistributedInitError("this process is not rank 0: start it with --headless (or as torchrun rank 0)")
    threads = threads_per_rank(len(specs))
    workers = [] if torchrun_env() else _spawn_workers(specs[1:], engine_config, model_config, device, with_mtp,
                                                       threads)
    torch.set_num_threads(threads)
    try:
        world = join_world(specs[0], device_backend(device), alive=lambda: _first_dead(workers))
        model = build_shard(world, engine_config, model_config, rank_device(device, 0), with_mtp)
        _barrier(world, "loading")
    except BaseException:
        _stop_all(workers)
        raise
    layout = ("DP-attention" if specs[0].data_parallel else "TP") + (" + EP" if specs[0].expert_parallel else "")
    logger.info("model loaded on %d ranks (%s, %d thread(s) per rank on this node)", specs[0].world_size, layout,
                threads)
    return DistributedModel(model, world, workers, on_worker_death)


def _barrier(world: World, what: str) -> None:
    try:
        loaded_barrier(world)
    except Exception as exc:
        details = "; ".join(world.failures()) or str(exc)
        raise WorkerFailure(f"a worker failed while {what}: {details}") from None


def _first_dead(workers: list[BaseProcess]) -> str | None:
    for process in workers:
        if process.exitcode is not None:
            return f"worker {process.name} exited with code {process.exitcode}"
    return None


def _stop_all(workers: list[BaseProcess], grace_s: float = _JOIN_TIMEOUT_S) -> None:
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


def run_headless(engine_config: EngineConfig, model_config: ModelConfig, device: torch.device) -> int:
    """A node that only runs workers (``--headless``): start its ranks and wait for them; exit with the first
    failure's code. SIGTERM / Ctrl-C stop them. Under torchrun (a rank other than 0) this process is the worker."""
    specs = world_specs(engine_config, engine_config.model)
    if specs[0].rank == 0:
        raise DistributedInitError("--headless on node 0: node 0 runs the driver (the API server); give the worker "
                                   "nodes --node-rank 1 and up")
    with_mtp = engine_config.num_speculative_tokens > 0
    threads = threads_per_rank(len(specs))
    if torchrun_env() is not None:
        run_worker(WorkerArgs(specs[0], engine_config, model_config, device, with_mtp, threads, os.getppid(),
                              logging.getLogger().getEffectiveLevel()))
        return 0
    workers = _spawn_workers(specs, engine_config, model_config, device, with_mtp, threads)
    logger.info("headless node %d: started ranks %s", engine_config.node_rank, [s.rank for s in specs])

    def stop(signum: int, frame: object) -> None:
        _stop_all(workers)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    from multiprocessing.connection import wait

    running = {process.sentinel: process for process in workers}
    while running:  # the first worker to fail stops the others (they may be waiting on it)
        for sentinel in wait(list(running)):
            process = running.pop(sentinel)
            process.join()
            if process.exitcode:
                _stop_all(workers)
                return 1
    return 0


# ---- calls across the ranks --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _TensorSlot:
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class _CacheRef:
    cache_id: int


@dataclass
class _Call:
    method: str
    args: tuple[Any, ...]
    released_caches: list[int]


def _map_leaves(value: Any, fn: Callable[[Any], Any]) -> Any:
    """``value`` rebuilt with ``fn`` applied to every leaf (dataclass fields and list / tuple items are walked, in
    order: the driver and the workers see the tensors of a call in the same order; the wire's own markers are
    leaves)."""
    if isinstance(value, (_TensorSlot, _CacheRef)):
        return fn(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _map_leaves(getattr(value, f.name), fn)
                                             for f in dataclasses.fields(value) if f.init})
    if isinstance(value, (list, tuple)):
        return type(value)(_map_leaves(v, fn) for v in value)
    return fn(value)


class DistributedModel:
    """The driver's handle on the whole model: the runner's model interface, mirrored to every rank."""

    def __init__(self, model: torch.nn.Module, world: World, workers: list[BaseProcess],
                 on_worker_death: Callable[[str], None] | None) -> None:
        self.model = model
        self.world = world
        self._workers = workers
        self._cache_ids: dict[int, int] = {}  # id(KVCache) -> cache id
        self._next_cache_id = 0
        self._released: list[int] = []
        self._failure: str | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._on_worker_death = on_worker_death
        self._last_send = time.monotonic()
        if workers:
            threading.Thread(target=self._watch_workers, name="dsv32-worker-watch", daemon=True).start()
        threading.Thread(target=self._heartbeat, name="dsv32-heartbeat", daemon=True).start()

    # The model's own attributes, read on the driver's shard.
    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def mtp(self) -> torch.nn.ModuleList:
        return self.model.mtp

    def kv_cache_bytes_per_token(self, kv_cache_dtype: str) -> int:
        return self.model.kv_cache_bytes_per_token(kv_cache_dtype)

    # Calls every rank runs.
    def allocate_kv_cache(self, num_blocks: int, block_size: int, kv_cache_dtype: str) -> Any:
        cache_id = self._next_cache_id
        self._next_cache_id += 1
        cache = self._call("allocate_kv_cache", num_blocks, block_size, kv_cache_dtype, cache_id=cache_id)
        self._cache_ids[id(cache)] = cache_id
        weakref.finalize(cache, self._release, id(cache), cache_id)
        return cache

    def __call__(self, batch: Any, kv_cache: Any) -> torch.Tensor:
        return self._call("forward", batch, kv_cache)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._call("compute_logits", hidden)

    def forward_mtp(self, batch: Any, previous_hidden: torch.Tensor, kv_cache: Any, depth: int = 0) -> torch.Tensor:
        return self._call("forward_mtp", batch, previous_hidden, kv_cache, depth)

    def compute_mtp_logits(self, hidden: torch.Tensor, depth: int = 0) -> torch.Tensor:
        return self._call("compute_mtp_logits", hidden, depth)

    def _release(self, object_id: int, cache_id: int) -> None:
        self._cache_ids.pop(object_id, None)
        self._released.append(cache_id)

    def _call(self, method: str, *args: Any, cache_id: int | None = None) -> Any:
        with self._lock:
            if self._failure is not None:
                raise WorkerFailure(self._failure)
            if self._closed:
                raise WorkerFailure("the model's worker processes have been stopped")
            tensors: list[torch.Tensor] = []

            def to_wire(value: Any) -> Any:  # tensors go separately, on the device's group; caches by id
                if isinstance(value, torch.Tensor):
                    tensors.append(value)
                    return _TensorSlot(tuple(value.shape), value.dtype)
                if id(value) in self._cache_ids:
                    return _CacheRef(self._cache_ids[id(value)])
                return value

            header = _Call(method, _map_leaves(args, to_wire), self._released)
            self._released = []
            try:
                send_call(self.world, header, tensors, cache_id)
                self._last_send = time.monotonic()
                if method == "allocate_kv_cache":
                    return self.model.allocate_kv_cache(*args)
                return getattr(self.model, method)(*args)
            except Exception as exc:
                # A collective failed (a peer is gone or stopped answering), or this rank failed half-way through a
                # call the others are in: the ranks are out of step for good.
                self._fail(exc)
                raise WorkerFailure(self._failure) from exc

    def _fail(self, exc: BaseException) -> None:
        """The ranks are out of step: say why as well as we can tell, and kill the local workers at once (a hung
        one would not act on SIGTERM, and there is nothing left to finish)."""
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "timed out" in text.lower():
            text = f"a rank did not answer within --distributed-timeout ({self.world.spec.timeout_s:g} s)"
        details = "; ".join(self.world.failures()) or _first_dead(self._workers) or text
        self._failure = f"a model worker failed ({details}); the engine cannot continue"
        logger.error("%s", self._failure)
        _stop_all(self._workers, grace_s=0.0)

    def _heartbeat(self) -> None:
        """While no call goes out, a no-op one every quarter of the timeout: the workers' wait for the next call
        never times out, and a worker that stopped answering is found even while the server idles."""
        interval = self.world.spec.timeout_s / 4
        while True:
            time.sleep(interval)
            with self._lock:
                if self._closed or self._failure is not None:
                    return
                if time.monotonic() - self._last_send < interval:
                    continue
                try:
                    send_call(self.world, _Call(_HEARTBEAT, (), []), [], None)
                    self._last_send = time.monotonic()
                    continue
                except Exception as exc:
                    self._fail(exc)
            if self._on_worker_death is not None:
                self._on_worker_death(self._failure or "a model worker failed")
            return

    def _watch_workers(self) -> None:
        """A local worker that dies (even while the driver is idle) ends the engine."""
        from multiprocessing.connection import wait

        sentinels = {process.sentinel: process for process in self._workers}
        for sentinel in wait(list(sentinels)):
            sentinels[sentinel].join(_JOIN_TIMEOUT_S)  # reaped, so its exit code is known
        if self._closed:
            return
        dead = _first_dead(self._workers) or "a worker exited"
        details = "; ".join(self.world.failures())
        message = f"{dead}{f' ({details})' if details else ''}"
        logger.error("model worker died: %s", message)
        self._failure = f"a model worker failed ({message}); the engine cannot continue"
        _stop_all(self._workers)
        if self._on_worker_death is not None:
            self._on_worker_death(message)

    def close(self) -> None:
        """Stop the workers (they exit their loop) and leave the world."""
        if self._closed:
            return
        self._closed = True
        if self._failure is None:
            try:
                with self._lock:
                    send_call(self.world, _Call(_STOP, (), []), [], None)
            except RuntimeError:
                pass
        for process in self._workers:
            process.join(_JOIN_TIMEOUT_S)
        _stop_all(self._workers)
        leave_world()


def send_call(world: World, header: _Call, tensors: list[torch.Tensor], cache_id: int | None) -> None:
    dist.broadcast_object_list([(header, cache_id)], src=0, group=world.control)
    for tensor in tensors:
        dist.broadcast(tensor.contiguous(), src=0, group=world.compute)


def receive_call(world: World, device: torch.device, caches: dict[int, Any]) -> tuple[_Call, int | None, Any]:
    """The next call from the driver: its header, the id of the cache it allocates (if so), and its arguments with
    the tensors received and the caches resolved."""
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0, group=world.control)
    header, cache_id = box[0]

    def from_wire(value: Any) -> Any:
        if isinstance(value, _TensorSlot):
            tensor = torch.empty(value.shape, dtype=value.dtype, device=device)
            dist.broadcast(tensor, src=0, group=world.compute)
            return tensor
        if isinstance(value, _CacheRef):
            return caches[value.cache_id]
        return value

    return header, cache_id, _map_leaves(header.args, from_wire)


def serve_calls(world: World, model: torch.nn.Module, device: torch.device) -> None:
    """A worker's life after loading: run every call the driver broadcasts, until it says stop."""
    caches: dict[int, Any] = {}
    while True:
        header, cache_id, args = receive_call(world, device, caches)
        for released in header.released_caches:
            caches.pop(released, None)
        if header.method == _STOP:
            return
        if header.method == _HEARTBEAT:
            continue
        with torch.inference_mode():
            if header.method == "allocate_kv_cache":
                caches[cache_id] = model.allocate_kv_cache(*args)
            else:
                getattr(model, header.method)(*args)


# ---- the worker process ------------------------------------------------------------------------------------------

def run_worker(args: WorkerArgs) -> None:
    """Entry point of a worker process: join, load this rank's shard, follow the driver until it stops."""
    die_with_parent(args.parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the process group: the driver decides
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
        model = build_shard(world, args.engine_config, args.model_config, device, args.with_mtp)
        loaded_barrier(world)
        serve_calls(world, model, device)
    except Exception as exc:
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        world.report_failure(message)
        logger.error("worker rank %d failed: %s", args.spec.rank, message)
        os._exit(1)
    leave_world()
