"""How the driver's model calls cross to the workers: a small pickled header on the CPU (``control`` group: method,
shapes, non-tensor arguments) followed by its tensors broadcast on the ``compute`` group (the device's own
transport), as vLLM's ``broadcast_tensor_dict`` does. KV caches are named by an id."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dsv32.distributed.groups import World
from dsv32.model.cache import KVCache

STOP = "__stop__"
HEARTBEAT = "__heartbeat__"


@dataclass(frozen=True)
class _TensorSlot:
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class _CacheRef:
    cache_id: int


@dataclass
class Call:
    """One model call (or ``STOP`` / ``HEARTBEAT``), and the ids of the caches the driver has dropped since the last."""

    method: str
    args: tuple[Any, ...]
    released_caches: list[int]


def map_leaves(value: Any, fn: Callable[[Any], Any]) -> Any:
    """``value`` rebuilt with ``fn`` applied to every leaf (dataclass fields and list / tuple items are walked, in
    order: the driver and the workers see the tensors of a call in the same order; the wire's own markers are
    leaves)."""
    if isinstance(value, (_TensorSlot, _CacheRef)):
        return fn(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: map_leaves(getattr(value, f.name), fn)
                                             for f in dataclasses.fields(value) if f.init})
    if isinstance(value, (list, tuple)):
        return type(value)(map_leaves(v, fn) for v in value)
    return fn(value)


def send_call(world: World, method: str, args: tuple[Any, ...], cache_ids: dict[int, int], released: list[int],
              new_cache_id: int | None = None) -> None:
    """Broadcast one call from the driver: tensors go separately, on the device's group; the caches in
    ``cache_ids`` (``id(cache)`` -> cache id) by id. ``new_cache_id``: the id the workers give the cache this call
    allocates."""
    tensors: list[torch.Tensor] = []

    def to_wire(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            tensors.append(value)
            return _TensorSlot(tuple(value.shape), value.dtype)
        if id(value) in cache_ids:
            return _CacheRef(cache_ids[id(value)])
        return value

    header = Call(method, map_leaves(args, to_wire), released)
    dist.broadcast_object_list([(header, new_cache_id)], src=0, group=world.control)
    for tensor in tensors:
        dist.broadcast(tensor.contiguous(), src=0, group=world.compute)


def receive_call(world: World, device: torch.device, caches: dict[int, KVCache]
                 ) -> tuple[Call, int | None, tuple[Any, ...]]:
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

    return header, cache_id, map_leaves(header.args, from_wire)
