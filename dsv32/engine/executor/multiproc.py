"""The model over ``world_size`` ranks, with the engine's scheduler on rank 0 alone (vLLM's ``MultiprocExecutor``).

The driver (rank 0: the engine-core process, or the offline ``LLM``'s process) holds a ``DistributedModel``: the
runner's ``ModelHandle``, whose every call (``forward``, ``compute_logits``, the MTP calls, KV-cache allocation) is
first broadcast to the workers (``wire``), then run on the driver's own shard; each worker runs it on its shard
(``worker.serve_calls``). The driver alone samples (logits are gathered to every rank; the workers drop them). A KV
cache the driver drops is released on the workers with the next call.

Processes: ``MultiprocExecutor`` spawns this node's other ranks (``--distributed-executor-backend mp``), joins the
world, loads its shard and waits until every rank has loaded; on other nodes ``worker.run_headless`` spawns that
node's ranks. Local workers die with the process that started them (``PR_SET_PDEATHSIG``); remote ones when the
driver's sockets close. Faults end everything: a worker that raises leaves its message in the store and exits; the
driver's next collective fails (at once when the peer's sockets close, else after ``collective_timeout_s``) and
raises ``WorkerFailure``, which the engine does not survive; a local worker that dies while the driver is idle is
seen by a watcher thread, which calls ``on_worker_death``.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from typing import Any

import torch

from dsv32.config import TINY_PRESET, EngineConfig, ModelConfig
from dsv32.distributed.groups import (
    DistributedInitError,
    World,
    device_backend,
    join_world,
    leave_world,
    loaded_barrier,
    torchrun_env,
)
from dsv32.distributed.parallel import validate_layout
from dsv32.engine.executor.base import Executor, WorkerFailure
from dsv32.engine.executor.wire import HEARTBEAT, STOP, send_call
from dsv32.engine.executor.worker import (
    JOIN_TIMEOUT_S,
    first_dead,
    load_shard,
    rank_device,
    spawn_workers,
    stop_all,
    world_specs,
)
from dsv32.engine.lifetime import threads_per_rank
from dsv32.model.batch import ForwardBatch
from dsv32.model.cache import KVCache
from dsv32.model.deepseek import DeepseekForCausalLM

logger = logging.getLogger(__name__)

# How long a failed collective waits for a local worker's death to be known, to say which one died and how.
DEAD_WORKER_WAIT_S = 1.0


class MultiprocExecutor(Executor):
    """Rank 0: start this node's workers, meet the other ranks, load the driver's shard, wait for every rank."""

    def __init__(self, engine_config: EngineConfig, model_config: ModelConfig, device: torch.device,
                 on_worker_death: Callable[[str], None] | None = None) -> None:
        validate_layout(model_config, engine_config.world_size, engine_config.enable_expert_parallel,
                        fp8_weights=engine_config.model != TINY_PRESET and engine_config.load_format != "dummy",
                        data_parallel=engine_config.data_parallel_size > 1)
        specs = world_specs(engine_config)
        if specs[0].rank != 0:
            raise DistributedInitError("this process is not rank 0: start it with --headless (or as torchrun rank 0)")
        threads = threads_per_rank(len(specs))
        workers = [] if torchrun_env() else spawn_workers(specs[1:], engine_config, model_config, device, threads)
        torch.set_num_threads(threads)
        try:
            world = join_world(specs[0], device_backend(device), alive=lambda: first_dead(workers))
            shard = load_shard(world, engine_config, model_config, rank_device(device, 0))
            _barrier(world, "loading")
        except BaseException:
            stop_all(workers)
            raise
        layout = ("DP-attention" if specs[0].data_parallel else "TP") + (" + EP" if specs[0].expert_parallel else "")
        logger.info("model loaded on %d ranks (%s, %d thread(s) per rank on this node)", specs[0].world_size, layout,
                    threads)
        self.model: DistributedModel = DistributedModel(shard, world, workers, on_worker_death)

    def close(self) -> None:
        self.model.close()


def _barrier(world: World, what: str) -> None:
    try:
        loaded_barrier(world)
    except Exception as exc:
        details = "; ".join(world.failures()) or str(exc)
        raise WorkerFailure(f"a worker failed while {what}: {details}") from None


class DistributedModel:
    """The driver's handle on the whole model: the runner's ``ModelHandle``, mirrored to every rank."""

    def __init__(self, model: DeepseekForCausalLM, world: World, workers: list[BaseProcess],
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

    def kv_cache_bytes_per_token(self, kv_cache_dtype: str) -> int:
        return self.model.kv_cache_bytes_per_token(kv_cache_dtype)

    def weight_bytes(self) -> int:
        return self.model.weight_bytes()

    # Calls every rank runs.
    def allocate_kv_cache(self, num_blocks: int, block_size: int, kv_cache_dtype: str) -> KVCache:
        cache_id = self._next_cache_id
        self._next_cache_id += 1
        cache: KVCache = self._call("allocate_kv_cache", num_blocks, block_size, kv_cache_dtype, cache_id=cache_id)
        self._cache_ids[id(cache)] = cache_id
        weakref.finalize(cache, self._release, id(cache), cache_id)
        return cache

    def __call__(self, batch: ForwardBatch, kv_cache: KVCache) -> torch.Tensor:
        return self._call("forward", batch, kv_cache)

    def capture_decode_graphs(self, kv_cache: KVCache) -> tuple[int, ...]:
        return self._call("capture_decode_graphs", kv_cache)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._call("compute_logits", hidden)

    def forward_mtp(self, batch: ForwardBatch, previous_hidden: torch.Tensor, kv_cache: KVCache,
                    depth: int = 0) -> torch.Tensor:
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
            released, self._released = self._released, []
            try:
                send_call(self.world, method, args, self._cache_ids, released, cache_id)
                self._last_send = time.monotonic()
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
        details = "; ".join(self.world.failures()) or self._dead_worker() or text
        self._failure = f"a model worker failed ({details}); the engine cannot continue"
        logger.error("%s", self._failure)
        stop_all(self._workers, grace_s=0.0)

    def _dead_worker(self) -> str | None:
        """Which local worker died, if one did: a killed worker's peers see the connection reset before it is
        reaped, so its exit code may need a moment (``DEAD_WORKER_WAIT_S``) to be known."""
        for sentinel in wait([process.sentinel for process in self._workers], DEAD_WORKER_WAIT_S):
            for process in self._workers:
                if process.sentinel == sentinel:
                    process.join(JOIN_TIMEOUT_S)
        return first_dead(self._workers)

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
                    send_call(self.world, HEARTBEAT, (), {}, [])
                    self._last_send = time.monotonic()
                    continue
                except Exception as exc:
                    self._fail(exc)
            if self._on_worker_death is not None:
                self._on_worker_death(self._failure or "a model worker failed")
            return

    def _watch_workers(self) -> None:
        """A local worker that dies (even while the driver is idle) ends the engine."""
        sentinels = {process.sentinel: process for process in self._workers}
        for sentinel in wait(list(sentinels)):
            sentinels[sentinel].join(JOIN_TIMEOUT_S)  # reaped, so its exit code is known
        if self._closed:
            return
        dead = first_dead(self._workers) or "a worker exited"
        details = "; ".join(self.world.failures())
        message = f"{dead}{f' ({details})' if details else ''}"
        logger.error("model worker died: %s", message)
        self._failure = f"a model worker failed ({message}); the engine cannot continue"
        stop_all(self._workers)
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
                    send_call(self.world, STOP, (), {}, [])
            except RuntimeError:
                pass
        for process in self._workers:
            process.join(JOIN_TIMEOUT_S)
        stop_all(self._workers)
        leave_world()
