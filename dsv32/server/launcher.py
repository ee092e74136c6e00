"""Start the engine and serve the app with uvicorn until SIGINT/SIGTERM.

Shutdown is graceful: uvicorn stops accepting connections, lets in-flight requests finish for up to
``shutdown_timeout`` seconds, then cancels the rest (each cancelled handler aborts its engine request), and the
app's lifespan finally shuts the engine down, aborting anything still queued.
"""

from __future__ import annotations

import asyncio
import logging

import uvicorn

from dsv32.config import TINY_PRESET, EngineConfig
from dsv32.server.app import build_app
from dsv32.server.settings import ServerConfig

logger = logging.getLogger("dsv32.server")


def serve(engine_config: EngineConfig, server_config: ServerConfig, *, host: str, port: int,
          shutdown_timeout: float, uvicorn_log_level: str) -> int:
    """Blocks until the server has stopped; returns the process exit code."""
    return asyncio.run(_serve(engine_config, server_config, host, port, shutdown_timeout, uvicorn_log_level))


async def _serve(engine_config: EngineConfig, server_config: ServerConfig, host: str, port: int,
                 shutdown_timeout: float, uvicorn_log_level: str) -> int:
    from dsv32.engine.async_engine import AsyncLLM

    if engine_config.model == TINY_PRESET:
        logger.warning("Serving the built-in `tiny` model with random (dummy) weights: its answers are noise. "
                       "Pass a DeepSeek-V3.2 checkpoint folder (`dsv32 serve /path/to/model`) for real output.")
    engine = AsyncLLM.from_engine_config(engine_config)
    app = build_app(engine, server_config)
    config = uvicorn.Config(app, host=host, port=port, log_level=uvicorn_log_level, lifespan="on",
                            timeout_graceful_shutdown=shutdown_timeout, access_log=False)
    server = uvicorn.Server(config)
    logger.info("serving %s as %s on http://%s:%d (max_model_len=%d, max_num_seqs=%d)", engine_config.model,
                ", ".join(server_config.served_model_names), host, port, engine.max_model_len,
                engine_config.max_num_seqs)
    await server.serve()
    logger.info("server stopped")
    return 0 if server.started else 1
