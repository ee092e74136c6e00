"""A short seeded run of benchmarks/fuzz_soak.py against its own `dsv32 serve`: 400 requests at concurrency 16 with
10% client cancels and 10% hostile bodies. Nothing may be lost or break the contract (2xx/4xx in the OpenAI
envelope, streams ending in [DONE]), and the engine must end idle with no KV block held (the script exits 1
otherwise). The long run (5,000 requests at concurrency 32) is in benchmarks/reliability.md."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.benchmark_scripts import BENCHMARKS

pytestmark = pytest.mark.e2e


def test_short_soak_loses_nothing_and_leaks_nothing() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "fuzz_soak.py"), "--requests", "400", "--concurrency", "16", "--seed", "7"],
        capture_output=True, text=True, timeout=600)
    report = result.stdout[-3000:] + result.stderr[-3000:]
    assert result.returncode == 0, report
    assert "lost (no answer within 60s or connection failed): 0" in result.stdout, report
    assert "broken contracts: 0" in result.stdout and "engine idle at the end" in result.stdout, report
