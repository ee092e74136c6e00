"""``AsyncLLM``: the in-process ``EngineClient``. The ``EngineCoreLoop`` runs in a background thread of this process,
the only thread that touches the core; commands reach it through a queue and its outputs (deltas) come back as the
core made them, with no copy or serialisation. ``dsv32 serve`` runs the engine in a process of its own
(``dsv32.engine.process``); this client is for embedding the engine in a Python program and for tests that drive the
HTTP layer without a second process.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading

from dsv32.config import EngineConfig
from dsv32.engine.client import QueueEngineClient
from dsv32.engine.core import EngineCore
from dsv32.engine.core_loop import EngineCoreLoop
from dsv32.engine.messages import Command, Shutdown

logger = logging.getLogger(__name__)


class AsyncLLM(QueueEngineClient):
    """Continuous batching behind an asyncio interface, in this process."""

    def __init__(self, core: EngineCore) -> None:
        super().__init__(core.tokenizer, core.model_config, core.engine_config, core.max_model_len, core.stats())
        self._core = core
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="dsv32-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_config(cls, engine_config: EngineConfig) -> AsyncLLM:
        """Load the model and tokenizer, size the KV cache, and start the engine thread."""
        return cls(EngineCore(engine_config))

    def _send(self, command: Command) -> None:
        self._commands.put(command)

    async def shutdown(self) -> None:
        if self.is_running:
            self._send(Shutdown())
        await asyncio.to_thread(self._thread.join)

    def _run(self) -> None:
        reason = "The engine has been shut down."
        try:
            EngineCoreLoop(self._core, self._commands, self._on_step_outputs).run()
        except Exception:  # logged here; every request in flight then fails with EngineDeadError
            logger.exception("the engine thread crashed")
            reason = "The engine thread crashed."
            for request_id in self._core.request_ids():
                self._core.abort_request(request_id)
        finally:
            self._core.close()
            self._on_engine_dead(reason)
