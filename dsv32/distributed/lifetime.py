"""Process set-up shared by the engine-core process and the model's worker processes (no torch here: the API
server imports it): dying with the parent, and the OpenMP spin policy of the model's threads."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

# libgomp's threads spin this many times waiting for the next parallel region before they sleep (default 300k, a
# fraction of a millisecond). A decode step runs hundreds of small parallel regions with Python in between; with the
# default the threads fall asleep between them and every region pays a wake-up, which on a machine shared with the
# API server process (and its clients) cost ~25% of serving throughput. 20M spins is some tens of milliseconds: the
# threads stay hot through a step and still sleep when the engine idles (OMP_WAIT_POLICY=ACTIVE never sleeps).
OPENMP_SPIN_ENV = {"GOMP_SPINCOUNT": "20000000"}


def tune_openmp_spin() -> None:
    """Apply ``OPENMP_SPIN_ENV`` unless set already; only effective before torch (libgomp) loads in this process or
    for the processes it starts afterwards."""
    for key, value in OPENMP_SPIN_ENV.items():
        os.environ.setdefault(key, value)


def die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this process when the process that started it dies, however it dies."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:  # it died before the line above
        os._exit(1)
