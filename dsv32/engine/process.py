"""The engine core in a process of its own (vLLM V1's ``EngineCoreProc`` + ``MPClient``, SGLang's scheduler process):
``MPEngineClient`` is the ``EngineClient`` the API server holds; ``run_engine_core`` is the other process.

Split: the API-server process does HTTP, tokenization and the chat template, output parsing (reasoning, tool calls)
and SSE; it never imports torch. The engine-core process owns the ``EngineCoreLoop`` over the ``EngineCore``
(scheduler, KV cache, runner, model, sampler) and gives the model every core it may run on. Text is still made in
the engine process, next to the tokens: stop strings must end a sequence in the very step that produced them (so no
token past a stop string is ever computed, counted or cached, and ``n > 1`` siblings stop independently), which
needs the detokenizer where the scheduler is; its cost is a few microseconds per token, small against a step.

Transport: two one-way ``multiprocessing`` pipes and pickle. Each direction carries one message per batch: the
server's writer thread sends every command queued since its last send as one list; the engine sends one
``StepOutputs`` per step with every request's output of that step, as the core made it: a delta (only the new text,
token ids and logprob ids/floats/ranks; the token strings of logprobs are decoded on the server side), so a step
costs one message whatever the batch size, and a message grows with the new tokens, not with the answers so far.
Pipes need no dependency (ZeroMQ would add pyzmq and msgspec for no gain with one client and one engine), and they
give what the lifetime rules need for free: a pipe reads EOF the moment the process at the other end dies. Each
process does its pipe I/O (and pickling) in threads of its own, so the event loop never blocks on a full pipe and the
engine's next step overlaps sending the last one's outputs.

Lifetime:
- model load errors come back as one ``EngineStartupFailed`` line (``EngineStartupError`` here); the process exits 1.
- engine process death (crash, OOM kill): the reader sees EOF, every request in flight ends with
  ``EngineDeadError`` (the server answers 503) and ``is_running`` turns False (``/health`` answers 503).
- a hung engine (busy, but no step reported for ``engine_step_timeout_s``) is killed by the client's watchdog thread
  and then fails like a dead one; so does a broken link (the client's reader or writer thread dying of an error).
  A command that cannot be pickled fails its own request only.
- server process death: the engine's reader sees EOF and the engine exits at once; ``PR_SET_PDEATHSIG`` kills it
  even if the server was SIGKILLed mid-step. Ctrl-C (SIGINT to the process group) is left to the server, which
  drains and then sends ``Shutdown``.
- ``shutdown()``: ``Shutdown`` aborts what is left and reports it; the process exits 0 (terminated, then killed,
  if it does not within ``SHUTDOWN_TIMEOUT_S``).

Tensor/expert parallelism attaches behind this boundary without changing it: the engine-core process becomes the
driver (rank 0) that runs the scheduler and broadcasts each step's batch to N workers it starts, which follow; the
server keeps talking to the driver alone.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from dsv32.config import ConfigError, EngineConfig
from dsv32.engine.client import QueueEngineClient
from dsv32.engine.lifetime import spawn, threads_per_rank, use_threads
from dsv32.engine.messages import (
    AddRequest,
    Command,
    EngineReady,
    EngineStartupFailed,
    Failure,
    Shutdown,
    StepOutputs,
    UtilityCall,
)
from dsv32.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# How long the engine process gets to exit after Shutdown, and after SIGTERM, before it is killed.
SHUTDOWN_TIMEOUT_S = 10.0
_TERMINATE_TIMEOUT_S = 5.0
# The engine process's log lines say where they come from (vLLM: "(EngineCore_DP0 pid=...)").
_LOG_FORMAT = "%(asctime)s %(levelname)s (engine core pid %(process)d) %(name)s: %(message)s"


class EngineStartupError(RuntimeError):
    """The engine-core process could not load the model (the message says why) or died while loading it."""


class MPEngineClient(QueueEngineClient):
    """The ``EngineClient`` of an engine core running in a child process (started by ``start``)."""

    def __init__(self, process: BaseProcess, from_engine: Connection, to_engine: Connection, tokenizer: Tokenizer,
                 engine_config: EngineConfig, ready: EngineReady) -> None:
        super().__init__(tokenizer, ready.model_config, engine_config, ready.max_model_len, ready.stats)
        self.pid = process.pid
        self._process = process
        self._from_engine = from_engine
        self._to_engine = to_engine
        self._outbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._shutting_down = False
        self._last_progress = time.monotonic()  # when the engine last reported, or the client last idled
        self._reader = self._thread(self._read, "reader")
        self._writer = self._thread(self._write, "writer")
        self._watchdog = self._thread(self._watch_progress, "watchdog")

    @classmethod
    async def start(cls, engine_config: EngineConfig) -> MPEngineClient:
        """Spawn the engine-core process and wait until its model is loaded (the tokenizer loads here meanwhile).
        Raises ``EngineStartupError`` if it cannot load; cancelled, it stops the process before re-raising."""
        from_engine, engine_out = multiprocessing.Pipe(duplex=False)
        engine_in, to_engine = multiprocessing.Pipe(duplex=False)
        # Started from this (the main) thread: PR_SET_PDEATHSIG fires when the thread that started the child ends.
        log_level = logging.getLogger().getEffectiveLevel()
        process = spawn(run_engine_core, (engine_config, engine_in, engine_out, log_level), "dsv32-engine-core",
                        engine_config.openmp_spin_count)
        engine_in.close()  # the child's ends: only the child may hold them, or its death would not read as EOF
        engine_out.close()
        logger.info("engine core process %d started; loading %s", process.pid, engine_config.model)
        tokenizer_load = asyncio.ensure_future(asyncio.to_thread(
            Tokenizer.from_pretrained, engine_config.tokenizer or engine_config.model))
        try:
            first = await asyncio.to_thread(_receive_one, from_engine)
            if not isinstance(first, EngineReady):
                await asyncio.to_thread(process.join, _TERMINATE_TIMEOUT_S)
                raise EngineStartupError(first.message if isinstance(first, EngineStartupFailed) else
                                         f"the engine core process exited with code {process.exitcode} while "
                                         "loading the model")
            tokenizer = await tokenizer_load
        except BaseException:
            tokenizer_load.cancel()
            await asyncio.to_thread(_stop, process)
            raise
        return cls(process, from_engine, to_engine, tokenizer, engine_config, first)

    def _send(self, command: Command) -> None:
        self._outbox.put(command)

    async def shutdown(self) -> None:
        if self.is_running and self._process.is_alive():
            self._shutting_down = True
            self._send(Shutdown())
            await asyncio.to_thread(self._process.join, SHUTDOWN_TIMEOUT_S)
        if self._process.is_alive():
            logger.warning("the engine core process did not stop within %.0f s; terminating it", SHUTDOWN_TIMEOUT_S)
        await asyncio.to_thread(_stop, self._process)
        await asyncio.to_thread(self._reader.join, _TERMINATE_TIMEOUT_S)

    def _thread(self, target: Callable[[], None], role: str) -> threading.Thread:
        """A started daemon thread of the engine link. The link cannot work without each of them: if one dies of
        an error, the engine is failed (requests in flight get 503, ``/health`` 503) instead of left hanging."""

        def supervised() -> None:
            try:
                target()
            except BaseException as exc:
                logger.exception("the engine link's %s thread died", role)
                self._fail_engine(f"The server's {role} thread for the engine died ({type(exc).__name__}).")

        thread = threading.Thread(target=supervised, name=f"dsv32-engine-{role}", daemon=True)
        thread.start()
        return thread

    def _fail_engine(self, reason: str) -> None:
        """Give up on the engine process: fail what is in flight with ``reason`` and kill the process."""
        self._on_engine_dead(reason)
        if self._process.is_alive():
            self._process.kill()

    def _read(self) -> None:
        """The reader thread: one ``StepOutputs`` per engine step until the pipe reads EOF (the engine is gone)."""
        try:
            while True:
                step = self._from_engine.recv()
                self._last_progress = time.monotonic()
                self._on_step_outputs(step)
        except (EOFError, OSError):
            pass
        if self._shutting_down:
            self._on_engine_dead("The engine has been shut down.")
            return
        self._process.join(_TERMINATE_TIMEOUT_S)
        _stop(self._process)
        logger.error("the engine core process died (exit code %s); failing the requests in flight",
                     self._process.exitcode)
        self._on_engine_dead(f"The engine core process died (exit code {self._process.exitcode}).")

    def _write(self) -> None:
        """The writer thread: every command queued since the last send goes out as one message."""
        while True:
            batch = [self._outbox.get()]
            while True:
                try:
                    batch.append(self._outbox.get_nowait())
                except queue.Empty:
                    break
            try:
                self._to_engine.send(batch)
            except OSError:  # the engine is gone; the reader reports it
                return
            except Exception:  # a command that cannot be pickled: send the others, fail that one alone
                for command in batch:
                    try:
                        self._to_engine.send([command])
                    except OSError:
                        return
                    except Exception as exc:
                        self._fail_unsendable(command, exc)
            if any(isinstance(command, Shutdown) for command in batch):
                return

    def _fail_unsendable(self, command: Command, exc: Exception) -> None:
        logger.error("a %s could not be sent to the engine: %s: %s", type(command).__name__, type(exc).__name__, exc)
        message = f"The request could not be sent to the engine ({type(exc).__name__})."
        if isinstance(command, AddRequest):
            self._on_step_outputs(StepOutputs([], self._stats, failures=[Failure(command.request_id, message)],
                                              num_seqs_added=command.params.n))
        elif isinstance(command, UtilityCall):
            self._on_step_outputs(StepOutputs([], self._stats, utility_results=[(command.call_id, exc)]))

    def _watch_progress(self) -> None:
        """The watchdog thread: an engine with work in flight that reports no step for ``engine_step_timeout_s``
        is hung (a deadlock, a stuck collective, a kernel that never returns); it is failed like a dead one."""
        timeout = self.engine_config.engine_step_timeout_s
        while self.is_running:
            time.sleep(min(1.0, timeout / 4))
            if not self.has_work_in_flight:
                self._last_progress = time.monotonic()  # idle time is not a stall
            elif time.monotonic() - self._last_progress > timeout:
                logger.error("the engine reported no step for %.0f s with requests in flight (--engine-step-timeout); "
                             "killing it as hung", timeout)
                self._fail_engine(f"The engine made no progress for {timeout:g} s (--engine-step-timeout) and was "
                                  "stopped as hung.")
                return


def _receive_one(conn: Connection) -> Any:
    try:
        return conn.recv()
    except EOFError:
        return None


def _stop(process: BaseProcess) -> None:
    """Make sure ``process`` is gone: SIGTERM, then SIGKILL."""
    if process.is_alive():
        process.terminate()
        process.join(_TERMINATE_TIMEOUT_S)
    if process.is_alive():
        process.kill()
        process.join()


# ---- the engine-core process ------------------------------------------------------------------------

def run_engine_core(engine_config: EngineConfig, commands_in: Connection, outputs_out: Connection,
                    log_level: int) -> None:
    """Entry point of the engine-core process (started by ``lifetime.spawn``: it dies with the server and leaves
    Ctrl-C to it): load, report ready (or why not), then serve the loop until ``Shutdown`` or until the server
    process is gone."""
    logging.basicConfig(level=log_level, format=_LOG_FORMAT)
    # This process runs nothing but the engine: the model's thread team gets every core it may run on (a
    # multi-process executor splits them between this node's ranks).
    threads = threads_per_rank(1)
    use_threads(threads)
    logger.info("engine core: %d model thread(s)", threads)
    try:
        from dsv32.distributed.groups import DistributedInitError  # torch: only in this process
        from dsv32.engine.core import EngineCore
        from dsv32.engine.executor import WorkerFailure

        core = EngineCore(engine_config, on_worker_death=_worker_died)
    except (ConfigError, OSError, ValueError, DistributedInitError, WorkerFailure) as exc:
        outputs_out.send(EngineStartupFailed(str(exc)))
        sys.exit(1)
    except Exception as exc:
        logger.exception("the engine core failed to start")
        outputs_out.send(EngineStartupFailed(f"{type(exc).__name__}: {exc}"))
        sys.exit(1)
    from dsv32.engine.core_loop import EngineCoreLoop

    outputs_out.send(EngineReady(core.model_config, core.max_model_len, core.stats()))
    commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
    outbox: queue.SimpleQueue[StepOutputs | None] = queue.SimpleQueue()
    threading.Thread(target=_receive_commands, args=(commands_in, commands), name="dsv32-commands",
                     daemon=True).start()
    sender = threading.Thread(target=_send_outputs, args=(outbox, outputs_out), name="dsv32-outputs", daemon=True)
    sender.start()
    try:
        EngineCoreLoop(core, commands, outbox.put).run()
    except WorkerFailure as exc:  # already explained where it was seen; the workers are gone
        logger.error("the engine core exits: %s", exc)
        os._exit(1)
    except BaseException:
        logger.exception("the engine core loop crashed")
        os._exit(1)
    core.close()
    outbox.put(None)
    sender.join()


def _worker_died(message: str) -> None:
    """A model worker died while the engine idled: end this process, as a crash mid-step would (the server fails
    what is in flight and turns unhealthy; the other workers die with it)."""
    logger.error("the engine core exits: %s", message)
    os._exit(1)


def _receive_commands(conn: Connection, commands: queue.SimpleQueue[Command]) -> None:
    try:
        while True:
            batch: list[Command] = conn.recv()
            for command in batch:
                commands.put(command)
            if any(isinstance(command, Shutdown) for command in batch):
                return
    except (EOFError, OSError):
        logger.error("the API server process is gone; the engine core exits")
        os._exit(1)


def _send_outputs(outbox: queue.SimpleQueue[StepOutputs | None], conn: Connection) -> None:
    while (step := outbox.get()) is not None:
        try:
            conn.send(step)
        except OSError:
            logger.error("the API server process is gone; the engine core exits")
            os._exit(1)
