"""The test tiers of tests/conftest.py: a test outside the ``e2e`` tier fails when it starts a process, whichever way
it starts it, and a test that uses a server-starting fixture is ``e2e`` without saying so."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import _SPAWN_POINTS, SpawnInUnitTestError

REFUSED = r"test_tiers\.py::test_.*: test spawns a process \(.*\): mark it e2e"


def test_every_spawn_point_is_guarded() -> None:
    assert all(hasattr(getattr(owner, name), "__wrapped__") for owner, name in _SPAWN_POINTS)


def test_subprocess_is_refused() -> None:
    with pytest.raises(SpawnInUnitTestError, match=REFUSED):
        subprocess.run(["true"], check=True)


def test_multiprocessing_is_refused() -> None:
    process = multiprocessing.get_context("spawn").Process(target=print)
    with pytest.raises(SpawnInUnitTestError, match=REFUSED):
        process.start()


def test_os_system_is_refused() -> None:
    with pytest.raises(SpawnInUnitTestError, match=REFUSED):
        os.system("true")


def test_asyncio_subprocesses_are_refused() -> None:
    with pytest.raises(SpawnInUnitTestError, match=REFUSED):
        asyncio.run(asyncio.create_subprocess_exec("true"))


def test_fixtures_that_start_servers_mark_their_tests_e2e(pytester: pytest.Pytester) -> None:
    """The tiers in a pytest session of their own (in this process: nothing is spawned), under the same conftest."""
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(test_inner="""
        import subprocess

        import pytest

        @pytest.fixture
        def server_factory():
            return None

        def test_uses_a_server(server_factory, request):
            assert request.node.get_closest_marker("e2e")

        @pytest.mark.e2e
        def test_marked():
            pass

        def test_spawns():
            subprocess.run(["true"])
    """)
    fast = pytester.runpytest_inprocess("-m", "not e2e")
    fast.assert_outcomes(failed=1, deselected=2)
    fast.stdout.fnmatch_lines(["*test_inner.py::test_spawns: test spawns a process (Popen.__init__): mark it e2e"])
    pytester.runpytest_inprocess("-m", "e2e").assert_outcomes(passed=2, deselected=1)
