"""Start the engine-core process and serve the app with uvicorn until SIGINT/SIGTERM.

Shutdown is graceful: the listening socket closes at once (new connections are refused), requests in flight get up
to ``shutdown_timeout`` seconds to finish, then the ones still running are aborted through the engine - so each
client still receives a proper ending (``finish_reason: "abort"``, ``[DONE]``) instead of a cut connection - and the
app's lifespan finally shuts the engine down (its process exits). A signal while the model is still loading stops
the engine process and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Iterator

import uvicorn

from dsv32.config import TINY_PRESET, ConfigError, EngineConfig
from dsv32.server.app import build_app
from dsv32.server.settings import ServerConfig
from dsv32.server.state import ServerState

logger = logging.getLogger("dsv32.server")

# After the aborts, how long handlers get to send their last chunks before uvicorn cancels them.
_ABORT_FLUSH_SECONDS = 5.0


class GracefulServer(uvicorn.Server):
    """uvicorn, plus: abort the engine requests still running once the drain period is over."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_seconds: float, ready_message: str) -> None:
        super().__init__(config)
        self._state = state
        self._drain_seconds = drain_seconds
        self._ready_message = ready_message

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:  # said only once the port is bound (uvicorn exits on a bind error)
            logger.info(self._ready_message)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM start the graceful shutdown (a second SIGINT forces it). Unlike uvicorn's own version this
        does not re-raise the signal once shut down, so a clean shutdown exits with status 0."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        aborter = asyncio.create_task(self._abort_after_drain())
        try:
            await super().shutdown(sockets)
        finally:
            aborter.cancel()

    async def _abort_after_drain(self) -> None:
        if self._state.active_requests:
            logger.info("shutting down: letting %d request(s) finish for up to %.0f s",
                        len(self._state.active_requests), self._drain_seconds)
        await asyncio.sleep(self._drain_seconds)
        aborted = await self._state.abort_all()
        if aborted:
            logger.warning("shutting down: aborted %d request(s) still running", aborted)


def serve(engine_config: EngineConfig, server_config: ServerConfig) -> int:
    """Blocks until the server has stopped; returns the process exit code."""
    return asyncio.run(_serve(engine_config, server_config))


async def _serve(engine_config: EngineConfig, server_config: ServerConfig) -> int:
    from dsv32.engine.process import EngineStartupError, MPEngineClient

    if engine_config.model == TINY_PRESET:
        logger.warning("Serving the built-in `tiny` model with random (dummy) weights: its answers are noise. "
                       "Pass a DeepSeek-V3.2 checkpoint folder (`dsv32 serve /path/to/model`) for real output.")
    # SIGINT/SIGTERM while the model loads: stop the engine process and exit cleanly (uvicorn handles them later).
    loop = asyncio.get_running_loop()
    starting = asyncio.ensure_future(MPEngineClient.start(engine_config))
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, starting.cancel)
    try:
        engine = await starting
    except asyncio.CancelledError:
        logger.info("shutdown requested while loading the model; the engine process is stopped")
        return 0
    except (ConfigError, OSError, ValueError, EngineStartupError) as exc:
        logger.error("cannot load %s: %s", engine_config.model, exc)
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    try:
        app = build_app(engine, server_config)
        host, port = server_config.host, server_config.port
        config = uvicorn.Config(app, host=host, port=port, log_level=server_config.uvicorn_log_level, lifespan="on",
                                timeout_graceful_shutdown=server_config.shutdown_timeout + _ABORT_FLUSH_SECONDS,
                                access_log=False)
        ready = (f"serving {engine_config.model} as {', '.join(server_config.served_model_names)} on "
                 f"http://{host}:{port} (max_model_len={engine.max_model_len}, max_num_seqs="
                 f"{engine_config.max_num_seqs}; engine core process {engine.pid})")
        server = GracefulServer(config, app.state.server, drain_seconds=server_config.shutdown_timeout,
                                ready_message=ready)
        await server.serve()
    finally:
        await engine.shutdown()  # also when uvicorn never started (port in use): no engine process outlives us
    logger.info("server stopped")
    return 0 if server.started else 1
