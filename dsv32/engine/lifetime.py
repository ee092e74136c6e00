"""The processes the engine starts (the engine-core process, the model's workers): how they are spawned, how they
die with their parent, the OpenMP and oneDNN settings they run under, and how many threads the model gets in each.

No torch at import (the API server imports it). The OpenMP settings are applied in the child alone, before torch
loads there: the caller's own process environment is never changed.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import pickle
import signal
import sys
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from multiprocessing.reduction import ForkingPickler
from typing import Any

logger = logging.getLogger(__name__)

# libgomp's threads spin this many times waiting for the next parallel region before they sleep (default 300k, a
# fraction of a millisecond). A decode step runs hundreds of small parallel regions with Python in between; with the
# default the threads fall asleep between them and every region pays a wake-up, which on a machine shared with the
# API server process (and its clients) cost ~25% of serving throughput. 20M spins is some tens of milliseconds: the
# threads stay hot through a step and still sleep when the engine idles (OMP_WAIT_POLICY=ACTIVE never sleeps).
DEFAULT_OPENMP_SPIN = 20_000_000
OPENMP_SPIN_ENV = "GOMP_SPINCOUNT"

# oneDNN (torch's bf16 GEMMs on CPU) keeps one primitive per GEMM shape it has run, up to 1024 by default, each with
# its own scratch memory. Cost-aware prefill chunks give nearly every step new shapes, so a 16K-token prompt grew the
# process by ~2.6 GB of cached primitives (peak RSS 4.1 GB; 1.6 GB with 64). A decode step uses ~15 shapes per batch
# size: 64 keeps them all (capacity 8 cost a third of batch-1 decode speed; 64 costs nothing measurable). Row counts
# that vary with the data are bucketed (``reference.bucketed_rows``) so that a mixed workload's shapes fit: batch 1
# and 8, prefill and decode, took ~100 distinct shapes a cycle before (a batch-1 prefill 43-51 ms instead of 31-35
# with a 1024-entry cache), 57 after.
DEFAULT_ONEDNN_PRIMITIVE_CACHE = 64
ONEDNN_PRIMITIVE_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"


class _Deferred:
    """A child's entry point and arguments, unpickled in the child only once its OpenMP settings are in place (the
    entry's module may import torch, which reads them when it loads).

    The spawn machinery pickles the child's arguments while it starts the child; ``__reduce__`` pickles ``entry`` and
    ``args`` at that moment with the same pickler, so pipes among them are passed to the child as usual, and turns
    them into bytes that the child unpickles when it is ready."""

    def __init__(self, entry: Callable[..., None], args: tuple[Any, ...]) -> None:
        self.entry = entry
        self.args = args

    def __reduce__(self) -> tuple[type[bytes], tuple[bytes]]:
        return bytes, (bytes(ForkingPickler.dumps((self.entry, self.args))),)


def spawn(entry: Callable[..., None], args: tuple[Any, ...], name: str, openmp_spin_count: int | None) -> BaseProcess:
    """Start ``entry(*args)`` in a new (spawned) process that dies with this one, leaves Ctrl-C to this one, and runs
    with libgomp's spin count ``openmp_spin_count`` (None: the one it inherits if set, else ``DEFAULT_OPENMP_SPIN``).

    Call it from a thread that lives as long as the child should: ``PR_SET_PDEATHSIG`` fires when the thread that
    started the child ends."""
    context = multiprocessing.get_context("spawn")
    process = context.Process(target=_child_main, name=name, daemon=False,
                              args=(os.getpid(), openmp_spin_count, _Deferred(entry, args)))
    process.start()
    return process


def _child_main(parent_pid: int, openmp_spin_count: int | None, work: bytes) -> None:
    """The first thing a spawned child runs (``work``: its ``_Deferred``, as bytes here)."""
    become_child_of(parent_pid)
    _apply_openmp_spin(openmp_spin_count)
    cap_onednn_primitive_cache()
    entry, args = pickle.loads(work)
    entry(*args)


def _apply_openmp_spin(count: int | None) -> None:
    if "torch" in sys.modules:  # loaded already (the parent's __main__, re-imported here, imports it): too late
        logger.debug("torch was loaded before %s could be set in this process", OPENMP_SPIN_ENV)
    if count is not None:
        os.environ[OPENMP_SPIN_ENV] = str(count)
    else:
        os.environ.setdefault(OPENMP_SPIN_ENV, str(DEFAULT_OPENMP_SPIN))


def cap_onednn_primitive_cache() -> None:
    """Bound oneDNN's primitive cache (``DEFAULT_ONEDNN_PRIMITIVE_CACHE``) unless the user set it. oneDNN reads the
    setting at the process's first GEMM: call this before the model runs one."""
    os.environ.setdefault(ONEDNN_PRIMITIVE_CACHE_ENV, str(DEFAULT_ONEDNN_PRIMITIVE_CACHE))


def become_child_of(parent_pid: int) -> None:
    """This process lives and stops with ``parent_pid``: it dies with it, and Ctrl-C (which reaches the whole
    process group) is left to it."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this process when the process that started it dies, however it dies."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:  # it died before the line above
        os._exit(1)


def threads_per_rank(local_ranks: int) -> int:
    """This machine's cores (those this process may run on) split between the ``local_ranks`` model processes on
    it; ``OMP_NUM_THREADS`` wins."""
    if "OMP_NUM_THREADS" in os.environ:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // local_ranks)


def use_threads(count: int) -> None:
    """Give this process's model ``count`` threads (torch's intra-op thread team)."""
    import torch

    torch.set_num_threads(count)
