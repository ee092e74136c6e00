"""Process groups: where this rank sits among the model's ranks, how the ranks meet, and the groups they talk over.

``WorldSpec`` is one rank's view of the launch (from the flags, or from torchrun's ``RANK`` / ``WORLD_SIZE`` /
``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT``). ``join_world`` makes the rendezvous: rank 0 hosts a
``TCPStore`` at ``master_addr:master_port``; every rank posts its view of the layout there and checks it against
rank 0's before ``torch.distributed`` starts, so a node launched with another ``--tensor-parallel-size`` or
``--nnodes`` fails with one clear line instead of hanging. It returns two groups over the same ranks:

* ``compute``: the model's collectives (NCCL on CUDA, gloo on CPU), with ``collective_timeout_s`` so a rank that
  stops answering ends the step with an error instead of a hang;
* ``control``: gloo on the CPU, where the driver broadcasts each model call, with the same timeout: while the
  server idles the driver sends a heartbeat call often enough that a worker's wait never reaches it, so a silent
  driver ends its workers and a silent worker fails the driver's next send (a dead peer shows at once either way:
  its sockets close).

Loading a large checkpoint can take longer than one collective may: the barrier that ends loading has its own
``LOAD_TIMEOUT``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# How long the ranks wait for each other to finish loading their shards.
LOAD_TIMEOUT = timedelta(hours=2)
DEFAULT_MASTER_PORT = 29500  # torchrun's


class DistributedInitError(RuntimeError):
    """The ranks could not meet (port in use, master unreachable, mismatched layouts); the message says which."""


@dataclass(frozen=True)
class WorldSpec:
    """One rank's view of the launch."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    data_parallel: bool  # data-parallel attention (else tensor parallel over every rank)
    expert_parallel: bool
    nnodes: int
    model: str
    timeout_s: float  # rendezvous and collective timeout
    agent_store: bool = False  # torchrun's agent already serves the store at master_addr:master_port

    def layout(self) -> dict[str, object]:
        """What every rank must agree on."""
        agreed = ("world_size", "data_parallel", "expert_parallel", "nnodes", "model")
        return {k: v for k, v in asdict(self).items() if k in agreed}


@dataclass
class World:
    """The joined ranks: the store they met at and their two groups."""

    spec: WorldSpec
    store: dist.Store
    compute: dist.ProcessGroup
    control: dist.ProcessGroup

    def report_failure(self, message: str) -> None:
        """Leave this rank's last words where the driver looks for them (``failure_of``)."""
        try:
            self.store.set(f"failed/{self.spec.rank}", message)
        except Exception:  # noqa: BLE001 - the store may be gone with the driver; nothing else to do
            pass

    def failures(self) -> list[str]:
        """The messages workers left before they died (rank order)."""
        found = []
        for rank in range(1, self.spec.world_size):
            key = f"failed/{rank}"
            try:
                if self.store.check([key]):
                    found.append(f"rank {rank}: {self.store.get(key).decode()}")
            except Exception:  # noqa: BLE001 - a broken store reads as no message
                break
        return found


def torchrun_env() -> dict[str, str] | None:
    """torchrun's variables when this process was started by it with more than one rank
    (``TORCHELASTIC_USE_AGENT_STORE``: its agent hosts the store, every rank connects to it)."""
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and all(k in os.environ for k in keys):
        return {k: os.environ[k] for k in keys}
    return None


def join_world(spec: WorldSpec, backend: str, alive: Callable[[], str | None] = lambda: None) -> World:
    """Rendezvous with the other ranks and create the groups. ``alive`` (rank 0) names a local worker that has died
    while waiting, so a worker that fails before it joins ends the wait at once."""
    timeout = timedelta(seconds=spec.timeout_s)
    where = f"{spec.master_addr}:{spec.master_port}"
    try:
        store = dist.TCPStore(spec.master_addr, spec.master_port, spec.world_size,
                              is_master=spec.rank == 0 and not spec.agent_store, timeout=timeout,
                              wait_for_workers=False, use_libuv=True)
    except (RuntimeError, dist.DistStoreError) as exc:
        text = str(exc).lower()
        if spec.rank == 0 and ("address already in use" in text or "errno: 98" in text):
            raise DistributedInitError(f"--master-port {spec.master_port} is already in use on "
                                       f"{spec.master_addr}: choose a free port") from None
        if spec.rank == 0:
            raise DistributedInitError(f"cannot listen on {where} for the other ranks: {exc}") from None
        raise DistributedInitError(f"cannot reach the master at {where} within {spec.timeout_s:.0f} s "
                                   f"(--master-addr / --master-port; is node 0 started and reachable?)") from None
    store.set(f"layout/{spec.rank}", json.dumps(spec.layout()))
    _check_layouts(spec, store, alive)
    dist.init_process_group(backend, store=store, rank=spec.rank, world_size=spec.world_size, timeout=timeout)
    compute = dist.group.WORLD
    control = dist.new_group(backend="gloo", timeout=timeout)
    return World(spec, store, compute, control)


def _check_layouts(spec: WorldSpec, store: dist.Store, alive: Callable[[], str | None]) -> None:
    """Every rank checks its layout against rank 0's; rank 0 waits until every rank has posted one."""
    mine = spec.layout()
    if spec.rank != 0:
        theirs = json.loads(store.get("layout/0"))
        if theirs != mine:
            diff = ", ".join(f"{k} {mine[k]!r} here but {theirs[k]!r} on node 0" for k in mine if mine[k] != theirs[k])
            store.set("mismatch", f"rank {spec.rank}: {diff}")
            raise DistributedInitError(f"this node's launch does not match node 0's: {diff}")
        return
    deadline = time.monotonic() + spec.timeout_s
    keys = [f"layout/{r}" for r in range(spec.world_size)]
    while not store.check(keys):
        if store.check(["mismatch"]):
            raise DistributedInitError(f"a node was launched with another layout ({store.get('mismatch').decode()}): "
                                       "give every node the same --tensor-parallel-size, --nnodes and model")
        if (dead := alive()) is not None:
            raise DistributedInitError(f"{dead} before joining")
        if time.monotonic() > deadline:
            joined = sum(store.check([k]) for k in keys)
            raise DistributedInitError(
                f"only {joined} of {spec.world_size} ranks joined at {spec.master_addr}:{spec.master_port} within "
                f"{spec.timeout_s:.0f} s: start the other nodes with the same --tensor-parallel-size and --nnodes "
                "(and --headless --node-rank N), and check that they reach --master-addr")
        time.sleep(0.05)


def loaded_barrier(world: World) -> None:
    """Every rank has loaded its shard (waits up to ``LOAD_TIMEOUT``, not the per-collective timeout)."""
    dist.monitored_barrier(group=world.control, timeout=LOAD_TIMEOUT)


def leave_world() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def device_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"
