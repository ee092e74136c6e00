"""Where the model runs, behind one ``Executor`` interface (vLLM's executors): ``make_executor`` picks it from the
``EngineConfig``.

* ``base``: the ``Executor`` interface and the ``ModelHandle`` it gives the runner and the drafter;
* ``loading``: the one function that loads the engine's model (or one rank's shard of it);
* ``uniproc``: ``UniProcExecutor``, the model in the engine's own process;
* ``multiproc``: ``MultiprocExecutor``, the model over several processes, this one the driver (rank 0);
* ``worker``: the other ranks' processes (and ``run_headless``, a node that runs only those);
* ``wire``: how a model call crosses from the driver to the workers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from dsv32.config import EngineConfig, ModelConfig
from dsv32.engine.executor.base import Executor, ModelHandle, WorkerFailure

if TYPE_CHECKING:
    import torch

__all__ = ["Executor", "ModelHandle", "WorkerFailure", "make_executor"]


def make_executor(engine_config: EngineConfig, model_config: ModelConfig, device: torch.device,
                  on_worker_death: Callable[[str], None] | None = None) -> Executor:
    """The executor ``engine_config`` asks for, with its model loaded: over ``world_size`` ranks this process is
    the driver, and ``on_worker_death`` is called (from another thread) if a worker dies while the engine idles."""
    if engine_config.world_size > 1:
        from dsv32.engine.executor.multiproc import MultiprocExecutor  # torch.distributed only when needed

        return MultiprocExecutor(engine_config, model_config, device, on_worker_death)
    from dsv32.engine.executor.uniproc import UniProcExecutor

    return UniProcExecutor(engine_config, model_config, device)
