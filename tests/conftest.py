"""The test tiers. ``e2e`` marks every test that starts a process (a real `dsv32 serve`, a router, torchrun, a
browser, an engine-core or model-worker process, a CLI run); ``make test-fast`` runs the others (``-m "not e2e"``),
``make test`` runs all.

The split is enforced here rather than left to review: a test not marked ``e2e`` that starts a process fails with
``SpawnInUnitTestError``. Tests that use a fixture which starts servers are marked ``e2e`` automatically.
"""

from __future__ import annotations

import functools
import multiprocessing.process
import os
import subprocess
from collections.abc import Callable, Generator
from typing import Any

import pytest

# Engines in tests run eagerly unless a test asks for compiled decode graphs (tests/model/test_graphs.py): compiling
# takes tens of seconds per engine. Servers and workers the tests start inherit it.
os.environ.setdefault("DSV32_ENFORCE_EAGER", "1")

pytest_plugins = ("pytester",)  # tests/test_tiers.py runs a pytest session of its own

# Fixtures that start processes: a test using one, directly or through another fixture, is e2e.
SPAWNING_FIXTURES = frozenset({"server_factory", "start_router"})

# Every way Python code here starts a process ends in one of these: subprocess (and asyncio's subprocesses),
# multiprocessing (any start method, process pools, torch.multiprocessing), or the os module's own calls.
_SPAWN_POINTS: tuple[tuple[Any, str], ...] = (
    (subprocess.Popen, "__init__"),
    (multiprocessing.process.BaseProcess, "start"),
    (os, "fork"),
    (os, "posix_spawn"),
    (os, "posix_spawnp"),
    (os, "system"),
)


class SpawnInUnitTestError(RuntimeError):
    """A test outside the e2e tier started a process."""


# The node id of the test now running (its setup, call and teardown) when it is not e2e; None otherwise. Module
# state rather than a fixture: a module- or session-scoped fixture set up for a unit test must be caught too, and
# function-scoped fixtures are set up after those.
_running_unit_test: str | None = None


def _guarded(spawn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(spawn)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        if _running_unit_test is not None:
            raise SpawnInUnitTestError(f"{_running_unit_test}: test spawns a process ({spawn.__qualname__}): "
                                       "mark it e2e")
        return spawn(*args, **kwargs)

    return guarded


def pytest_sessionstart(session: pytest.Session) -> None:
    patch = pytest.MonkeyPatch()
    for owner, name in _SPAWN_POINTS:
        patch.setattr(owner, name, _guarded(getattr(owner, name)))
    session.config.add_cleanup(patch.undo)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SPAWNING_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    global _running_unit_test
    _running_unit_test = None if item.get_closest_marker("e2e") else item.nodeid
    try:
        return (yield)
    finally:
        _running_unit_test = None
