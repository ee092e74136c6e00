"""Processes the engine spawns: the OpenMP spin count and oneDNN's primitive-cache bound are set in the child alone
(the caller's environment is left as it was), pipes cross to it, and thread counts split the cores between a node's
ranks."""

from __future__ import annotations

import multiprocessing
import os
from multiprocessing.connection import Connection

import pytest

from dsv32.engine.lifetime import (
    DEFAULT_ONEDNN_PRIMITIVE_CACHE,
    DEFAULT_OPENMP_SPIN,
    ONEDNN_PRIMITIVE_CACHE_ENV,
    OPENMP_SPIN_ENV,
    spawn,
    threads_per_rank,
)


def report_env(out: Connection, name: str) -> None:
    out.send(os.environ.get(name))


def spin_in_child(count: int | None, name: str = OPENMP_SPIN_ENV) -> str | None:
    """The child's value of the variable ``name`` when it is spawned with spin count ``count``."""
    receive, send = multiprocessing.Pipe(duplex=False)
    process = spawn(report_env, (send, name), "dsv32-test-child", count)
    send.close()
    try:
        return receive.recv()
    finally:
        process.join(30)


@pytest.mark.e2e
def test_spin_count_is_set_in_the_child_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(OPENMP_SPIN_ENV, raising=False)
    assert spin_in_child(None) == str(DEFAULT_OPENMP_SPIN)
    assert spin_in_child(1234) == "1234"
    assert OPENMP_SPIN_ENV not in os.environ


@pytest.mark.e2e
def test_an_inherited_spin_count_wins_over_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(OPENMP_SPIN_ENV, "77")
    assert spin_in_child(None) == "77"
    assert spin_in_child(5) == "5"
    assert os.environ[OPENMP_SPIN_ENV] == "77"


@pytest.mark.e2e
def test_onednn_primitive_cache_is_bounded_in_the_child_unless_the_user_set_it(monkeypatch: pytest.MonkeyPatch
                                                                               ) -> None:
    monkeypatch.delenv(ONEDNN_PRIMITIVE_CACHE_ENV, raising=False)
    assert spin_in_child(None, ONEDNN_PRIMITIVE_CACHE_ENV) == str(DEFAULT_ONEDNN_PRIMITIVE_CACHE)
    assert ONEDNN_PRIMITIVE_CACHE_ENV not in os.environ
    monkeypatch.setenv(ONEDNN_PRIMITIVE_CACHE_ENV, "512")
    assert spin_in_child(None, ONEDNN_PRIMITIVE_CACHE_ENV) == "512"


def test_threads_per_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert threads_per_rank(1) == cores
    assert threads_per_rank(cores * 2) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads_per_rank(2) == 3
