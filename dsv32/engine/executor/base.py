"""What the engine holds of the model: an ``Executor`` (it loads the model, wherever that runs, and stops it) and
the ``ModelHandle`` it gives the runner and the drafter."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from dsv32.config import ModelConfig
    from dsv32.model.batch import ForwardBatch
    from dsv32.model.cache import KVCache


class WorkerFailure(RuntimeError):
    """A rank of the model failed or vanished: the engine cannot continue (every process is being stopped)."""


class ModelHandle(Protocol):
    """What the runner and the drafter use of the model: ``DeepseekForCausalLM`` itself in one process; over many,
    the driver's ``DistributedModel``, which runs each call on every rank."""

    @property
    def config(self) -> ModelConfig: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def kv_cache_bytes_per_token(self, kv_cache_dtype: str) -> int: ...

    def weight_bytes(self) -> int:
        """Bytes of the weights this process holds (its shard), as stored (``dsv32.model.quantize.weight_bytes``)."""

    def allocate_kv_cache(self, num_blocks: int, block_size: int, kv_cache_dtype: str) -> KVCache: ...

    def __call__(self, batch: ForwardBatch, kv_cache: KVCache) -> torch.Tensor:
        """Final-normed hidden states of every token of ``batch``; writes their KV to ``kv_cache``."""

    def capture_decode_graphs(self, kv_cache: KVCache) -> tuple[int, ...]:
        """Compile the decode graphs now (every rank); the batch sizes captured (none: the model runs eagerly)."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def forward_mtp(self, batch: ForwardBatch, previous_hidden: torch.Tensor, kv_cache: KVCache,
                    depth: int = 0) -> torch.Tensor: ...

    def compute_mtp_logits(self, hidden: torch.Tensor, depth: int = 0) -> torch.Tensor: ...


class Executor(ABC):
    """Runs the model for the engine: ``model`` is its handle, ``close`` stops what it started (the engine is
    unusable afterwards; calling it again does nothing)."""

    model: ModelHandle

    @abstractmethod
    def close(self) -> None: ...
